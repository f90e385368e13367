"""What the tests' throw-away servers (s3server, slurm_cluster, sshd_server) share: free loopback
ports, finding daemons outside PATH, and a fixture body that starts one or fails with its logs."""
from __future__ import annotations

import contextlib
import shutil
import socket
from pathlib import Path

import pytest

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


def free_ports(n: int) -> list[int]:
    # Hold all sockets open until all are chosen so the n ports are distinct.
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            # weed derives nothing from these, but keep grpc-style "+10000" collisions impossible
            if port not in ports and port + 10000 not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


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
