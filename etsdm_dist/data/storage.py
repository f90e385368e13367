"""String paths that are either local files or fsspec URLs (s3://, gs://, http(s)://).

Everything that touches storage goes through here, so there is one place that knows:
- how to write atomically (a reader must never see half an index or a half checkpoint marker),
- how to retry a read (backoff with jitter, fresh connections, resume from the bytes received);
  which errors are worth retrying is retry.py's verdict, a pure function of the exception,
- how webdataset opens remote shards (1.0.2 has no s3:// handler; we register one).

Credentials come only from the standard AWS chain (env vars, profile, instance role) that
botocore reads itself; this module never sees or logs them.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from typing import Any, Callable

# The error family and the verdict are re-exported: callers catch storage.ShardReadError and
# ask storage.is_transient, whichever module defines them.
from etsdm_dist.data.retry import (  # noqa: F401 - CRED_HINT: re-exported
    CRED_HINT, ShardNotFoundError, ShardReadError, StorageAccessError, explain_error,
    is_invalid_range, is_transient, sleep_backoff)

log = logging.getLogger(__name__)

_FLAT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"}
_LOCAL_PROTOCOLS = {"", "file", "local"}


# --------------------------------------------------------------------------- paths


def _protocol(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_remote(path: str) -> bool:
    return _protocol(str(path)) not in _LOCAL_PROTOCOLS


def _local(path: str) -> str:
    path = str(path)
    return path.split("://", 1)[1] if _protocol(path) in ("file", "local") else path


def join(base: str, *parts: str) -> str:
    base = str(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out += "/" + p
    return out


# --------------------------------------------------------------------------- filesystems

# Our own cache instead of fsspec's instance cache: keyed by pid (a forked DataLoader worker must
# not reuse its parent's event loop or sockets) and dropped on a transient error so a restarted
# server is reached through fresh connections instead of dead keep-alive ones.
_FS_CACHE: dict[tuple[int, str, bool], Any] = {}
_FS_LOCK = threading.Lock()


def _fs_options(protocol: str, reads: bool) -> dict:
    if protocol in ("s3", "s3a"):
        return {
            # Listings must be fresh: checkpoints and shards appear while we run.
            "use_listings_cache": False,
            # Range reads get no hidden retries: read_range owns that policy (backoff with jitter,
            # fresh connections, resume from the bytes received). Other calls keep botocore's.
            "config_kwargs": {"retries": {"total_max_attempts": 1 if reads else 4,
                                          "mode": "standard"},
                              "connect_timeout": 10, "read_timeout": 60},
        }
    return {}


def _fs(path: str, reads: bool = False):
    """(filesystem, protocol-stripped path) for a remote URL."""
    import fsspec

    proto = _protocol(path)
    key = (os.getpid(), proto, reads)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            cls = fsspec.get_filesystem_class(proto)
            fs = cls(skip_instance_cache=True, **_fs_options(proto, reads))
            if proto in ("s3", "s3a"):
                fs.retries = 1 if reads else 3  # s3fs's own loop (a class attribute, not a kwarg)
            _FS_CACHE[key] = fs
    return fs, fs._strip_protocol(path)


def invalidate(path: str | None = None) -> None:
    """Forget cached filesystems (all, or the one serving `path`): the next call reconnects."""
    with _FS_LOCK:
        if path is None:
            _FS_CACHE.clear()
        else:
            for reads in (False, True):
                _FS_CACHE.pop((os.getpid(), _protocol(path), reads), None)


# --------------------------------------------------------------------------- basic operations


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(_local(path))
    fs, p = _fs(path)
    return fs.exists(p)


def listdir(path: str) -> list[str]:
    """Sorted entry names (not paths); FileNotFoundError when there is nothing there."""
    if not is_remote(path):
        return sorted(os.listdir(_local(path)))
    fs, p = _fs(path)
    p = p.rstrip("/")
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)}
    names.discard("")
    return sorted(names)


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(_local(path), exist_ok=True)
    elif _protocol(path) not in _FLAT_PROTOCOLS:
        fs, p = _fs(path)
        fs.makedirs(p, exist_ok=True)


def remove(path: str, recursive: bool = False) -> None:
    if not is_remote(path):
        lp = _local(path)
        if os.path.isdir(lp) and not os.path.islink(lp):
            shutil.rmtree(lp) if recursive else os.rmdir(lp)
        else:
            os.remove(lp)
        return
    fs, p = _fs(path)
    fs.rm(p, recursive=recursive)


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(_local(path))
    fs, p = _fs(path)
    return int(fs.size(p))


def read_bytes(path: str, *, retries: int = 8, backoff_s: float = 0.5) -> bytes:
    if not is_remote(path):
        with open(_local(path), "rb") as f:
            return f.read()
    total = _with_retries(lambda: size(path), path, retries, backoff_s)
    return read_range(path, 0, total, retries=retries, backoff_s=backoff_s)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d or ".", os.O_RDONLY)
    except OSError:
        return  # not supported on this filesystem: the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_local(path: str):
    """Yield (file, temp path) in `path`'s directory; on success: fsync, rename over `path`, fsync
    the directory (so the rename survives a crash). On failure the temp file is removed."""
    lp = _local(path)
    d = os.path.dirname(os.path.abspath(lp))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(lp)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide shared datasets from others
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, lp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(d)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """All or nothing: readers see the old content or the new, never a prefix.

    Local: temp file in the same directory (same filesystem, so the rename is atomic). Remote: one
    PUT (multipart for large data), which S3 makes atomic.
    """
    if is_remote(path):
        fs, p = _fs(path)
        fs.pipe_file(p, bytes(data))
        return
    with _atomic_local(path) as (f, _):
        f.write(data)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


def write_json_atomic(path: str, obj: Any, *, indent: int | None = 1) -> None:
    text = json.dumps(obj, indent=indent, separators=None if indent else (",", ":"))
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def upload_file(local: str, remote: str) -> None:
    """Copy a local file to `remote` (local or URL); the destination appears whole or not at all."""
    if not is_remote(remote):
        with _atomic_local(remote) as (out, _), open(_local(local), "rb") as inp:
            shutil.copyfileobj(inp, out, 8 << 20)
        return
    fs, p = _fs(remote)
    fs.put_file(_local(local), p)  # single PUT or multipart: both atomic on S3


def download_file(remote: str, local: str, *, retries: int = 8, backoff_s: float = 0.5) -> None:
    if not is_remote(remote):
        upload_file(remote, local)
        return
    p = _fs(remote)[1]
    with _atomic_local(local) as (_, tmp):
        _with_retries(lambda: _fs(remote)[0].get_file(p, tmp), remote, retries, backoff_s)


def _walk_files(path: str) -> list[str]:
    """Relative paths ('a/b.txt') of all files under a local dir or remote prefix."""
    if not is_remote(path):
        root = _local(path)
        out = []
        for d, _, files in os.walk(root):
            for f in files:
                out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
        return sorted(out)
    fs, p = _fs(path)
    p = p.rstrip("/")
    return sorted(f[len(p) + 1:] for f in fs.find(p) if f.startswith(p + "/"))


def upload_dir(local_dir: str, remote_dir: str) -> None:
    for rel in _walk_files(local_dir):
        upload_file(os.path.join(_local(local_dir), *rel.split("/")), join(remote_dir, rel))


def download_dir(remote_dir: str, local_dir: str) -> None:
    rels = _walk_files(remote_dir)
    if not rels and not exists(remote_dir):
        raise FileNotFoundError(f"{remote_dir}: nothing to download")
    for rel in rels:
        download_file(join(remote_dir, rel), os.path.join(_local(local_dir), *rel.split("/")))


# --------------------------------------------------------------------------- retrying reads


def _with_retries(fn: Callable[[], Any], url: str, retries: int, backoff_s: float) -> Any:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if isinstance(e, FileNotFoundError):
                raise ShardNotFoundError(url, "object not found", reason="missing") from e
            if not is_transient(e) or attempt == retries:
                raise
            log.warning("%s: transient error (%s: %s), retry %d/%d", url, type(e).__name__, e,
                        attempt + 1, retries)
            invalidate(url)
            sleep_backoff(attempt, backoff_s)


def read_range(path: str, start: int, end: int, *, retries: int = 8, backoff_s: float = 0.5,
               chunk_bytes: int = 8 << 20,
               progress: Callable[[int], None] | None = None) -> bytes:
    """Bytes [start, end) of `path`, surviving transient storage errors.

    Reads in chunks of `chunk_bytes`; after a transient error it re-requests only the bytes not yet
    received. `retries` bounds consecutive failures without progress. `progress(n)` is called with
    the bytes received so far after each chunk. Raises ShardNotFoundError (missing object) or
    ShardReadError (object shorter than `end`: truncated; retries exhausted; permanent error).
    """
    if not 0 <= start <= end:
        raise ValueError(f"{path}: bad byte range [{start}, {end})")
    if not is_remote(path):
        try:
            with open(_local(path), "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        except FileNotFoundError as e:
            raise ShardNotFoundError(path, "file not found", start=start, end=end,
                                     reason="missing") from e
        if len(data) != end - start:
            raise ShardReadError(path, f"short read: file is {start + len(data)} bytes, expected "
                                 f"at least {end} (truncated)", start=start, end=end,
                                 reason="truncated")
        if progress:
            progress(len(data))
        return data

    parts: list[bytes] = []
    pos, failures = start, 0
    while pos < end:
        stop = min(pos + chunk_bytes, end)
        try:
            fs, p = _fs(path, reads=True)
            chunk = fs.cat_file(p, start=pos, end=stop)
        except Exception as e:
            if isinstance(e, FileNotFoundError):
                raise ShardNotFoundError(path, "object not found", start=start, end=end,
                                         reason="missing") from e
            if is_invalid_range(e):  # asked past the end of the object
                chunk = b""
            elif not is_transient(e):
                raise ShardReadError(path, explain_error(path, e).split(": ", 1)[-1],
                                     start=start, end=end) from e
            elif failures >= retries:
                raise ShardReadError(path, f"gave up after {retries} retries at byte {pos} "
                                     f"({type(e).__name__}: {e})", start=start, end=end,
                                     reason="retries_exhausted") from e
            else:
                failures += 1
                log.warning("%s: transient error at byte %d of [%d, %d) (%s: %s); retry %d/%d, "
                            "resuming at byte %d", path, pos, start, end, type(e).__name__, e,
                            failures, retries, pos)
                invalidate(path)  # dead keep-alive connections must not be reused
                sleep_backoff(failures - 1, backoff_s)
                continue
        if len(chunk) < stop - pos:
            raise ShardReadError(path, f"short read: object ends at byte {pos + len(chunk)}, "
                                 f"expected at least {end} (truncated)", start=start, end=end,
                                 reason="truncated")
        parts.append(chunk)
        pos += len(chunk)
        failures = 0
        if progress:
            progress(pos - start)
    return b"".join(parts)


class _RangeReader(io.RawIOBase):
    """Sequential reader over read_range: a stream that survives server hiccups mid-shard."""

    def __init__(self, url: str, total: int, retries: int, backoff_s: float):
        super().__init__()
        self.url, self.total, self.retries, self.backoff_s, self.pos = url, total, retries, backoff_s, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.total - self.pos)
        if n <= 0:
            return 0
        data = read_range(self.url, self.pos, self.pos + n, retries=self.retries,
                          backoff_s=self.backoff_s)
        b[:n] = data
        self.pos += n
        return n


def open_reader(url: str, *, block_bytes: int = 8 << 20, retries: int = 8,
                backoff_s: float = 0.5) -> io.BufferedReader:
    """A buffered binary stream over `url` that retries and resumes transient read errors."""
    if not is_remote(url):
        return open(_local(url), "rb")
    total = _with_retries(lambda: size(url), url, retries, backoff_s)
    return io.BufferedReader(_RangeReader(url, total, retries, backoff_s), buffer_size=block_bytes)


# --------------------------------------------------------------------------- webdataset

_WDS_SCHEMES = ("s3", "s3a", "gs", "gcs", "http", "https", "az", "abfs", "abfss")
_wds_lock = threading.Lock()


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode == "rb":
        return open_reader(url)
    import fsspec  # writing: buffered upload, committed on close

    return fsspec.open(url, mode).open()


def register_webdataset_handlers() -> None:
    """Route webdataset's remote URLs through fsspec (no curl subprocess, no `pipe:` shell)."""
    import webdataset

    with _wds_lock:
        for scheme in _WDS_SCHEMES:
            webdataset.gopen_schemes[scheme] = _gopen_fsspec


def check_writable(url: str) -> None:
    """Fail early with an actionable message if `url` (a directory/prefix) cannot be written."""
    probe = join(url, ".etsdm-write-probe")
    try:
        makedirs(url)
        write_bytes_atomic(probe, b"ok")
        remove(probe)
    except Exception as e:
        raise StorageAccessError(f"cannot write to {explain_error(url, e)}") from e
