"""`etsdm train` as a script path, for launchers that take a file instead of a module (DeepSpeed
0.19.8's mpich runner puts -m before its own helper). Same as `python -m etsdm_dist.train`."""
import sys

from etsdm_dist.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
