"""Shared fixtures: a real S3 server (SeaweedFS) for the session, fresh buckets, real image data."""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_harness, ds_worker, daemons importable

# One intra-op thread everywhere: tests compare in-process steps with ranks in subprocesses bit for
# bit, and a conv/matmul split over a different number of threads rounds differently. (Ranks get
# OMP_NUM_THREADS=1 from the harness; this makes the pytest process match whatever order tests run.)
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

from etsdm_dist.data.local_s3 import SeaweedServer  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Real photos extracted from the scikit-image wheel by tools/install.sh.
PHOTOS = Path(sys.prefix) / "share" / "etsdm-photos"
_bucket_ids = itertools.count()


def _forget_filesystems() -> None:
    from etsdm_dist.data import storage

    storage.invalidate()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One SeaweedFS server for the session; its AWS_* env vars are set in os.environ, so s3fs
    in this process and any subprocess reach it through the standard credential chain."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    _forget_filesystems()  # clients made before now would not know the endpoint
    try:
        yield server
    finally:
        server.stop()
        _forget_filesystems()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3) -> str:
    """A new, empty bucket: returns "s3://name"."""
    return s3.make_bucket(f"t{os.getpid()}-{next(_bucket_ids)}")


@pytest.fixture
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """A folder of real photos (astronaut, coffee, chelsea, ...), put there by tools/install.sh."""
    if not (PHOTOS / "astronaut.png").exists():
        pytest.fail(f"{PHOTOS} missing: run tools/install.sh")
    return PHOTOS


# --------------------------------------------------------------------------- training runs
# Shared by test_training*.py and test_launchers.py: the Fashion-MNIST shards and the one
# uninterrupted 2-rank fp32 ZeRO-2 reference run are made once per session (train_harness caches
# them under the session's base temp dir) and every resumed / re-launched run is compared to it.


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def data(base) -> str:
    import train_harness

    return train_harness.ensure_shards(base)


@pytest.fixture(scope="session")
def reference(base, data):
    import train_harness

    return train_harness.ensure_reference(base)
