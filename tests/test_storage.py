"""storage.py against the local filesystem and a real S3 server (SeaweedFS); no mocks."""
from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import threading
import time

import pytest

from etsdm_dist.data import storage
from etsdm_dist.data import tarformat
from etsdm_dist.data.local_s3 import SeaweedServer


def test_paths():
    assert storage.is_remote("s3://b/k") and storage.is_remote("https://h/x")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://b/p/", "/a/", "c.tar") == "s3://b/p/a/c.tar"
    assert storage.join("/tmp/d", "x") == os.path.join("/tmp/d", "x")


def test_write_bytes_atomic_local(tmp_path):
    p = str(tmp_path / "sub" / "marker.json")
    storage.write_json_atomic(p, {"step": 1})
    storage.write_json_atomic(p, {"step": 2})
    assert storage.read_json(p) == {"step": 2}
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o644)
    # A write that fails half way leaves the old content and no temp file behind.
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(p, object())
    assert storage.read_json(p) == {"step": 2}
    assert storage.listdir(str(tmp_path / "sub")) == ["marker.json"]


def test_remote_roundtrip(s3_bucket, tmp_path):
    base = storage.join(s3_bucket, "run")
    storage.makedirs(base)  # no-op on S3, must not fail
    storage.write_json_atomic(storage.join(base, "a.json"), {"x": 1})
    storage.write_bytes_atomic(storage.join(base, "sub", "b.bin"), b"\x00\x01" * 1000)
    assert storage.read_json(storage.join(base, "a.json")) == {"x": 1}
    assert storage.listdir(base) == ["a.json", "sub"]
    assert storage.exists(storage.join(base, "sub")) and not storage.exists(storage.join(base, "zz"))
    assert storage.size(storage.join(base, "sub", "b.bin")) == 2000
    # Directory round trip: remote -> local -> remote -> local must be byte-identical.
    storage.download_dir(base, str(tmp_path / "d1"))
    storage.upload_dir(str(tmp_path / "d1"), storage.join(s3_bucket, "copy"))
    storage.download_dir(storage.join(s3_bucket, "copy"), str(tmp_path / "d2"))
    assert (tmp_path / "d2" / "sub" / "b.bin").read_bytes() == b"\x00\x01" * 1000
    storage.upload_dir(str(tmp_path / "d2"), str(tmp_path / "d3"))  # local -> local copies
    assert (tmp_path / "d3" / "a.json").read_bytes() == (tmp_path / "d1" / "a.json").read_bytes()
    storage.remove(base, recursive=True)
    assert not storage.exists(storage.join(base, "a.json"))
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(s3_bucket, "never"), str(tmp_path / "d4"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_range_missing_and_short(where, s3_bucket, tmp_path):
    base = s3_bucket if where == "s3" else str(tmp_path)
    url = storage.join(base, "obj.bin")
    payload = os.urandom(5000)
    storage.write_bytes_atomic(url, payload)
    assert storage.read_range(url, 100, 4100) == payload[100:4100]
    assert storage.read_range(url, 0, 5000, chunk_bytes=999) == payload
    with pytest.raises(storage.ShardReadError) as ei:  # index says more bytes than exist
        storage.read_range(url, 4000, 6000)
    assert ei.value.reason == "truncated" and url in str(ei.value) and "[4000, 6000)" in str(ei.value)
    with pytest.raises(storage.ShardReadError) as ei:  # starts past the end
        storage.read_range(url, 5000, 5010)
    assert ei.value.reason == "truncated"
    missing = storage.join(base, "nope.tar")
    with pytest.raises(FileNotFoundError) as ei:
        storage.read_range(missing, 0, 10)
    assert isinstance(ei.value, storage.ShardReadError) and ei.value.url == missing
    assert missing in str(ei.value) and ei.value.reason == "missing"


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A second server these tests may stop and restart without disturbing the session one."""
    server = SeaweedServer(tmp_path_factory.mktemp("sw-bounce")).start()
    yield server
    server.stop()


@pytest.fixture
def on_own_server(own_server, monkeypatch):
    for k, v in own_server.env.items():
        monkeypatch.setenv(k, v)
    storage.invalidate()  # filesystems read the endpoint from the env when created
    own_server.start()  # no-op when running
    yield own_server
    storage.invalidate()


def test_read_range_resumes_across_server_restart(on_own_server, caplog):
    """The server dies after the second chunk and comes back 1.5 s later: the read completes
    with the right bytes and never re-reads what it already had (progress only moves forward)."""
    server = on_own_server
    url = server.make_bucket("restart") + "/big.bin"
    payload = os.urandom(3 << 20)
    storage.write_bytes_atomic(url, payload)
    chunk = 256 << 10
    seen: list[int] = []
    stopped = threading.Event()

    def bounce():
        server.stop()
        stopped.set()
        time.sleep(1.5)
        server.start()

    def progress(n):
        seen.append(n)
        if len(seen) == 2:  # mid-read: take the server down before the next request
            threading.Thread(target=bounce, daemon=True).start()
            assert stopped.wait(30)

    caplog.set_level(logging.WARNING, logger="etsdm_dist.data.storage")
    t0 = time.monotonic()
    data = storage.read_range(url, 1000, len(payload), chunk_bytes=chunk, backoff_s=0.3,
                              retries=8, progress=progress)
    assert data == payload[1000:]
    assert seen == sorted(set(seen)) and seen[-1] == len(payload) - 1000
    assert f"resuming at byte {1000 + 2 * chunk}" in caplog.text  # not from byte 1000
    assert time.monotonic() - t0 < 60


def test_read_range_gives_up_when_server_stays_down(on_own_server):
    url = on_own_server.make_bucket("down") + "/x.bin"
    storage.write_bytes_atomic(url, b"x" * 100)
    on_own_server.stop()
    with pytest.raises(storage.ShardReadError) as ei:
        storage.read_range(url, 0, 100, retries=1, backoff_s=0.05)
    assert ei.value.reason == "retries_exhausted" and url in str(ei.value)
    assert "gave up after 1 retries" in str(ei.value)


def test_is_transient():
    import aiohttp
    from botocore.exceptions import (ClientError, EndpointConnectionError, NoCredentialsError,
                                     ReadTimeoutError)
    from s3fs.errors import translate_boto_error

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    transient = [
        ConnectionResetError(), ConnectionRefusedError(), BrokenPipeError(), TimeoutError(),
        socket.timeout(), OSError(errno.ECONNRESET, "reset"), http.client.IncompleteRead(b""),
        EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
        client_error("SlowDown", 503), client_error("InternalError", 500),
        client_error("Throttling", 400), aiohttp.ServerDisconnectedError(),
        aiohttp.ClientResponseError(None, (), status=503),
        translate_boto_error(client_error("SlowDown", 503)),  # what s3fs raises: OSError(EBUSY)
        translate_boto_error(client_error("InternalError", 500)),
    ]
    permanent = [
        FileNotFoundError(), PermissionError(), ValueError("bad"), KeyError("x"),
        client_error("NoSuchKey", 404), client_error("AccessDenied", 403),
        translate_boto_error(client_error("NoSuchKey", 404)),
        translate_boto_error(client_error("AccessDenied", 403)),
        aiohttp.ClientResponseError(None, (), status=404), NoCredentialsError(),
        storage.ShardReadError("s3://b/k", "truncated"), OSError(errno.ENOSPC, "full"),
    ]
    for e in transient:
        assert storage.is_transient(e), repr(e)
    for e in permanent:
        assert not storage.is_transient(e), repr(e)
    wrapped = OSError("read failed")
    wrapped.__cause__ = ConnectionResetError()
    assert storage.is_transient(wrapped)


def test_webdataset_reads_s3_shard(s3_bucket):
    import webdataset as wds

    storage.register_webdataset_handlers()
    storage.register_webdataset_handlers()  # idempotent
    assert wds.gopen_schemes["s3"] is wds.gopen_schemes["https"] is storage._gopen_fsspec
    body = b"".join(tarformat.sample_bytes(f"{i:09d}", {"png": bytes([i]) * (700 + i),
                                                        "cls": str(i % 3).encode()})
                    for i in range(5))
    url = storage.join(s3_bucket, "s-000000.tar")
    storage.write_bytes_atomic(url, body + tarformat.end_of_archive(len(body)))
    got = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(5)]
    assert all(s["png"] == bytes([i]) * (700 + i) and s["cls"] == str(i % 3).encode()
               for i, s in enumerate(got))
