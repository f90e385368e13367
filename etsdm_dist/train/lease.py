"""An exclusive lease on a run directory: at most one training run writes to a train.run_dir.

Two runs in one directory would interleave stats.jsonl and delete each other's checkpoints, so
rank 0 takes a lease before anything is written, keeps it for the whole run and releases it at
the end. The lease is the object/file `LEASE` in the run directory, a JSON holder record: host,
pid, start time, run id, sequence number, lease duration, released flag.

Local run directory (`LocalLease`): an flock(2) on `LEASE`, held by rank 0 for the whole run.
The kernel drops it when the process dies, however it dies, so a crash never leaves a stale lock;
the record only names the holder in the refusal message. flock conflicts between any two open
file descriptions, also within one process. Not guaranteed: on a network filesystem without
cluster-wide flock (Lustre mounted with `localflock`, some NFSv3 set-ups) the lock only excludes
runs on the same node.

Object storage (`ObjectLease`, s3://): conditional PUTs, which S3 and SeaweedFS (>= 4.48, checked
with concurrent writers in tests/test_lease.py) apply atomically:
  - take: PUT If-None-Match: * (create only if absent);
  - renew: every lease_s / 4 a daemon thread PUTs a new record (sequence + 1) If-Match: <the ETag
    of our last write>. A failed precondition means another run took the lease over: the lease is
    lost, and `check()` (called by the loop before every write) stops the run;
  - a run holds its lease for 3/4 of lease_s after sending its last successful renewal; past that
    `check()` tries one renewal itself and reports the lease lost if it fails;
  - a second run that finds an unreleased record watches its ETag (HEAD) with its own monotonic
    clock: a change means a live holder renewed it, and the run refuses, naming the holder; no
    change for a whole lease duration (the longer of the holder's and its own) means the holder is
    gone (crashed, killed), and the run takes the lease over with If-Match on the ETag it watched,
    so of several runs racing for a stale lease exactly one wins. Wall clocks are never compared,
    so clock skew between hosts does not matter; only clock rates do, and the 1/4 margin covers them.
  - a released record (clean exit) is taken over at once, again with If-Match.
Every record is unique (run id + sequence number), so an ETag never repeats, and a write whose
response was lost (timeout, retried request) is resolved by reading the record back.

Not guaranteed: writes are not fenced. A holder that stalls (SIGSTOP, swap, a storage outage
while a checkpoint is being written) for longer than lease_s after its last `check()` can still
finish that write after another run took over. `check()` before each write narrows the window to
the duration of one write.
"""
from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable

from etsdm_dist.data import storage

LEASE_FILE = "LEASE"
# Renew four times per lease: three renewals in a row may fail (a storage hiccup) before it lapses.
RENEW_PER_LEASE = 4
# A holder trusts its lease for 3/4 of its duration after sending its last successful renewal; a
# run that takes over waits a whole duration after *seeing* that renewal. The 1/4 in between covers
# the time from a check() to the end of the write it guards, and differences in clock rates.
TRUST_FRACTION = 0.75
# While watching a foreign lease, look at it this many times per lease duration.
POLLS_PER_LEASE = 8
_S3_PROTOCOLS = ("s3", "s3a")

Log = Callable[[str], None]


class LeaseError(RuntimeError):
    """The run directory cannot be leased (unsupported storage, filesystem without locks)."""


class LeaseHeld(LeaseError):
    """Another live run holds the lease; `holder` is its record (may be {} if unreadable)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class LeaseLost(LeaseError):
    """This run's lease was taken over, or could not be renewed in time: it must not write."""


def _stderr_log(msg: str) -> None:
    print(f"[etsdm] lease: {msg}", file=sys.stderr, flush=True)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- records (pure)


def new_record(lease_s: float | None) -> dict:
    """This process's holder record, sequence 0 (lease_s None: a lock, no expiry)."""
    now = _utc_now()
    # No command line: overrides may carry secrets, and the record is stored and printed.
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "run_id": uuid.uuid4().hex,
           "seq": 0, "renewed": now, "released": False}
    if lease_s is not None:
        rec["lease_s"] = float(lease_s)
    return rec


def parse_record(data: bytes) -> dict | None:
    """A holder record from the bytes of LEASE; None if empty or not a record (torn, foreign)."""
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "run_id" in rec else None


def encode_record(rec: dict) -> bytes:
    return (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode("utf-8")


def describe_holder(rec: dict | None) -> str:
    """'host H, pid P, started T (run id R, ...)' for messages."""
    if not rec:
        return "an unknown run (its lease record is unreadable)"
    extra = f", last renewed {rec['renewed']}" if rec.get("renewed") not in (None, rec.get("started")) else ""
    return (f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, started {rec.get('started', '?')} "
            f"(run id {str(rec.get('run_id', '?'))[:12]}{extra})")


def refusal_message(run_dir: str, rec: dict | None, remote: bool) -> str:
    how = ("a run that crashed keeps it until its lease expires (train.lease_s after its last "
           "renewal); a rerun then takes it over" if remote else
           "a run that crashed holds no lock: the kernel released it when the process died")
    return (f"train.run_dir={run_dir} is in use by another run: {describe_holder(rec)}. Two runs in "
            f"one run directory overwrite each other's checkpoints and stats: wait for that run to "
            f"end, stop it, or set another train.run_dir ({how})")


# --------------------------------------------------------------------------- the leases


class Lease:
    """A held lease. `check()` before writing; `release()` at the end (idempotent)."""

    run_dir: str
    path: str
    record: dict

    def lost_reason(self) -> str | None:
        raise NotImplementedError

    def check(self) -> None:
        reason = self.lost_reason()
        if reason is not None:
            raise LeaseLost(reason)

    def release(self) -> None:
        raise NotImplementedError


def acquire(run_dir: str, *, lease_s: float = 60.0, log: Log = _stderr_log) -> Lease:
    """Take the lease on `run_dir` (creating the directory) or raise LeaseHeld naming the holder.
    On object storage this may watch a foreign, unreleased lease for up to a lease duration."""
    if not lease_s > 0:
        raise ValueError(f"train.lease_s: must be positive, got {lease_s}")
    if not storage.is_remote(run_dir):
        return LocalLease.take(run_dir, log)
    proto = run_dir.split("://", 1)[0].lower()
    if proto not in _S3_PROTOCOLS:
        raise LeaseError(f"train.run_dir={run_dir}: run directories on {proto}:// cannot be leased "
                         f"(only local paths and s3:// have the locks or conditional writes it needs)")
    return ObjectLease.take(run_dir, lease_s, log)


def acquire_on_rank0(run_dir: str, *, lease_s: float, log: Log = _stderr_log) -> Lease | None:
    """Collective: rank 0 takes the lease (`acquire`) and one all-gather gives every rank the
    outcome, so all of them raise LeaseHeld (or LeaseError: storage refused) or none does. Rank 0
    gets the Lease, the others None."""
    from etsdm_dist import dist  # here: a lease alone needs no torch

    held, refusal = None, None
    if dist.is_main():
        try:
            held = acquire(run_dir, lease_s=lease_s, log=log)
        except LeaseHeld as e:
            refusal = ("held", str(e))
        except Exception as e:  # noqa: BLE001 - raised on every rank below, not on rank 0 alone
            refusal = ("error", f"cannot take the lease on train.run_dir={run_dir}: {type(e).__name__}: {e}")
    refusal = dist.all_gather_object(refusal)[0]
    if refusal is not None:
        raise LeaseHeld(refusal[1], {}) if refusal[0] == "held" else LeaseError(refusal[1])
    return held


def lost_on_rank0(held: Lease | None, device=None, log: Log = _stderr_log) -> bool:
    """Collective (one all-reduce): whether rank 0's lease is lost, on every rank; rank 0 logs why."""
    from etsdm_dist import dist

    reason = held.lost_reason() if held is not None else None
    if reason is not None:
        log(reason)
    return dist.any_rank(reason is not None, device)


class LocalLease(Lease):
    def __init__(self, run_dir: str, path: str, fd: int, record: dict):
        self.run_dir, self.path, self.fd, self.record = run_dir, path, fd, record

    @classmethod
    def take(cls, run_dir: str, log: Log) -> "LocalLease":
        d = run_dir.split("://", 1)[1] if "://" in run_dir else run_dir  # file:// or local://
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, LEASE_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_locked_record(path)
            raise LeaseHeld(refusal_message(run_dir, holder, remote=False), holder or {}) from None
        except OSError as e:
            os.close(fd)
            raise LeaseError(f"train.run_dir={run_dir}: cannot lock {path} ({e}); this filesystem has "
                             f"no flock (Lustre: mount with -o flock), choose a local or s3:// run_dir") from e
        previous = parse_record(os.pread(fd, 1 << 16, 0))
        if previous is not None and not previous.get("released"):
            log(f"{path}: the previous run ({describe_holder(previous)}) ended without releasing its "
                f"lease (crashed or killed); its lock died with it, taking the run directory over")
        record = new_record(None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, encode_record(record), 0)
        os.fsync(fd)
        held = cls(run_dir, path, fd, record)
        atexit.register(held.release)  # an exception exit is an end too; the kernel covers the rest
        return held

    def lost_reason(self) -> str | None:
        if self.fd < 0:
            return f"{self.path}: lease already released"
        try:
            same = os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            same = False
        # Another run could lock a new LEASE file created in its place.
        return None if same else (f"{self.path} was removed or replaced while this run held it "
                                  f"(was the run directory deleted?): stopping before writing to it")

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            rec = {**self.record, "released": True, "released_at": _utc_now()}
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, encode_record(rec), 0)
            os.fsync(self.fd)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _read_locked_record(path: str, tries: int = 20) -> dict | None:
    """The holder's record; it may be mid-write (truncate + write), so retry briefly."""
    for _ in range(tries):
        try:
            with open(path, "rb") as f:
                rec = parse_record(f.read())
        except OSError:
            rec = None
        if rec is not None:
            return rec
        time.sleep(0.05)
    return None


# --------------------------------------------------------------------------- object storage


def _precondition_failed(e: BaseException | None) -> bool:
    """Whether a (possibly wrapped: s3fs turns it into OSError) S3 error is a failed If-Match /
    If-None-Match: HTTP 412 PreconditionFailed."""
    while e is not None:
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = (resp.get("Error") or {}).get("Code")
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return code == "PreconditionFailed" or status == 412
        e = e.__cause__ or e.__context__
    return False


class _Objects:
    """The four S3 calls a lease needs, through s3fs (the credential chain storage.py uses)."""

    def __init__(self, url: str):
        import fsspec.core

        self.url = url
        self.fs, self.key = fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)

    def put(self, data: bytes, etag: str | None) -> str | None:
        """Create (etag None) or replace the object holding `etag`; its new ETag, or None when the
        precondition failed (it exists / it changed). Other errors raise (the outcome is unknown)."""
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            return self.fs.pipe_file(self.key, data, **cond)["ETag"]
        except Exception as e:  # noqa: BLE001 - sorted into "lost the race" and "unknown" here
            if _precondition_failed(e):
                return None
            raise

    def head(self) -> str | None:
        try:
            return self.fs.info(self.key)["ETag"]
        except FileNotFoundError:
            return None

    def read(self) -> tuple[str, dict | None] | None:
        """(ETag, record) of one version of the object, or None if there is none."""
        for _ in range(5):
            before = self.head()
            if before is None:
                return None
            try:
                data = self.fs.cat_file(self.key)
            except FileNotFoundError:
                continue
            if self.head() == before:  # the bytes belong to that ETag (records never repeat)
                return before, parse_record(data)
        raise LeaseError(f"{self.url}: the lease record keeps changing while being read")


class ObjectLease(Lease):
    def __init__(self, run_dir: str, objects: _Objects, record: dict, etag: str, lease_s: float, log: Log):
        self.run_dir, self.path, self.objects = run_dir, objects.url, objects
        self.record, self.etag, self.lease_s, self.log = record, etag, lease_s, log
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._trusted_until = time.monotonic() + lease_s * TRUST_FRACTION
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="etsdm-lease", daemon=True)
        self._thread.start()
        # The lease lives as long as the process: released at any orderly exit (also after an
        # exception); only a kill leaves it to expire.
        atexit.register(self.release)

    # ---------------------------------------------------------------- taking it

    @classmethod
    def take(cls, run_dir: str, lease_s: float, log: Log) -> "ObjectLease":
        objects = _Objects(storage.join(run_dir, LEASE_FILE))
        record = new_record(lease_s)
        sent = time.monotonic()
        etag = cls._write(objects, record, None)
        if etag is not None:
            return cls(run_dir, objects, record, etag, lease_s, log)._trusted_from(sent)
        watched: str | None = None  # the foreign ETag being watched, and since when
        since = watch_s = 0.0
        while True:
            found = objects.read()
            seen_at = time.monotonic()
            if found is None:  # released and deleted by hand meanwhile: create again
                sent = time.monotonic()
                etag = cls._write(objects, record, None)
                if etag is not None:
                    return cls(run_dir, objects, record, etag, lease_s, log)._trusted_from(sent)
                continue
            theirs, holder = found
            if watched is not None and theirs != watched:
                raise LeaseHeld(refusal_message(run_dir, holder, remote=True), holder or {})
            stale = watched is not None and seen_at - since >= watch_s
            if (holder or {}).get("released") or stale:
                sent = time.monotonic()
                etag = cls._write(objects, record, theirs)
                if etag is not None:
                    log(f"{objects.url}: the previous run ({describe_holder(holder)}) "
                        + ("released the lease; taking it" if not stale else
                           f"did not renew its lease for {watch_s:g}s (crashed or killed?); took it over"))
                    return cls(run_dir, objects, record, etag, lease_s, log)._trusted_from(sent)
                continue  # another run was faster: the next read sees its record change
            if watched is None:
                # The longer of the two durations: a holder renewing rarely must not look dead.
                theirs_s = float((holder or {}).get("lease_s") or 0.0)
                watched, since, watch_s = theirs, seen_at, max(lease_s, theirs_s)
                log(f"{objects.url} is leased by {describe_holder(holder)}; watching it for up to "
                    f"{watch_s:g}s to see whether that run is alive")
            time.sleep(min(watch_s / POLLS_PER_LEASE, max(0.0, since + watch_s - time.monotonic()) + 0.01))

    @staticmethod
    def _write(objects: _Objects, record: dict, etag: str | None) -> str | None:
        """One conditional PUT of `record`: its ETag, or None if the precondition failed. When the
        outcome is unclear (an error after the request may have landed, or a failed precondition
        that may be a retry of our own landed request) the record read back decides: ours at this
        sequence number means the write is done."""
        try:
            written = objects.put(encode_record(record), etag)
            error = None
        except Exception as e:  # noqa: BLE001 - decided by the read-back below
            written, error = None, e
        if written is not None:
            return written
        found = objects.read()
        if found is not None and found[1] is not None and \
                (found[1].get("run_id"), found[1].get("seq")) == (record["run_id"], record["seq"]):
            return found[0]
        if error is not None:
            raise error
        return None

    def _trusted_from(self, sent: float) -> "ObjectLease":
        self._trusted_until = sent + self.lease_s * TRUST_FRACTION
        return self

    # ---------------------------------------------------------------- keeping it

    def renew(self) -> None:
        """One renewal (thread-safe). Raises LeaseLost if another run holds the lease now; other
        errors (storage unreachable) propagate and leave the lease as it was."""
        with self._lock:
            if self._lost is not None:
                raise LeaseLost(self._lost)
            if self._stop.is_set():
                return
            record = {**self.record, "seq": self.record["seq"] + 1, "renewed": _utc_now()}
            sent = time.monotonic()
            try:
                etag = self._write(self.objects, record, self.etag)
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {e}"
                raise
            if etag is None:
                found = self.objects.read()
                self._lost = (f"the lease on train.run_dir={self.run_dir} was taken over by "
                              f"{describe_holder(found[1] if found else None)}; this run "
                              f"({describe_holder(self.record)}) stops before writing anything more")
                raise LeaseLost(self._lost)
            self.record, self.etag, self._last_error = record, etag, None
            self._trusted_from(sent)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / RENEW_PER_LEASE):
            try:
                self.renew()
            except LeaseLost as e:
                self.log(str(e))
                return
            except Exception as e:  # noqa: BLE001 - retried at the next tick; check() judges
                self.log(f"{self.path}: renewal failed ({type(e).__name__}: {e}); retrying")

    def lost_reason(self) -> str | None:
        if self._lost is None and time.monotonic() > self._trusted_until:
            try:
                self.renew()  # the thread may just be behind (storage hiccup): try once more now
            except LeaseLost:
                pass
            except Exception as e:  # noqa: BLE001 - reported below
                return (f"the lease on train.run_dir={self.run_dir} could not be renewed for "
                        f"{self.lease_s * TRUST_FRACTION:g}s ({type(e).__name__}: {e}; before: "
                        f"{self._last_error}); another run may take it over, so this run stops "
                        f"before writing anything more")
        return self._lost

    def release(self) -> None:
        """Stop renewing and mark the record released, so that the next run starts at once."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        with self._lock:
            if self._lost is not None:
                return
            record = {**self.record, "seq": self.record["seq"] + 1, "renewed": _utc_now(),
                      "released": True, "released_at": _utc_now()}
            try:
                etag = self._write(self.objects, record, self.etag)
            except Exception as e:  # noqa: BLE001 - the next run takes over after one lease_s
                self.log(f"{self.path}: could not release the lease ({type(e).__name__}: {e}); "
                         f"the next run waits up to {self.lease_s:g}s for it to expire")
                return
            if etag is None:
                self.log(f"{self.path}: not released: another run had taken the lease over")
            else:
                self.record, self.etag = record, etag
