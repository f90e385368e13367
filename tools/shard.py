#!/usr/bin/env python
"""Cluster-job entry for `etsdm shard` (same arguments), for hosts without the console script.

    python tools/shard.py /data/photos s3://bucket/photos-64 --resolution 64 --format jpg --workers 16
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from etsdm_dist.data.shard_writer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
