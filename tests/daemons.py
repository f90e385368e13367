"""What the tests' throw-away servers (slurm_cluster, sshd_server; SeaweedFS lives in etsdm_dist.data.local_s3) share: free loopback
ports, finding daemons outside PATH, and a fixture body that starts one or fails with its logs."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from etsdm_dist.data.local_s3 import free_ports  # noqa: F401  (re-exported for the servers here)

# Debian installs daemons (sshd, slurmctld, munged) in /usr/sbin, not always on a test's PATH.
_SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


@contextlib.contextmanager
def running(server, missing: list[str], hint: str, errors: type[Exception]):
    """Start `server`, yield it, stop it. Missing binaries or a failed start FAIL the test (with
    the daemon logs the error carries): a skipped check would pass CI without testing anything."""
    if missing:
        pytest.fail(f"binaries missing: {missing}; {hint}", pytrace=False)
    try:
        server.start()
    except errors as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
