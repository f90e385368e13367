"""`python -m etsdm_dist.train CONFIG [key=value ...]`: the form launchers start (deepspeed --module,
torchrun -m, srun python -m, mpiexec python -m). Same as `etsdm train`."""
import sys

from etsdm_dist.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
