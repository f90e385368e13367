"""Read planning for the loader: when byte ranges coalesce into one request; requests in flight.

A micro-batch of one rank is a few contiguous runs of samples inside shards (shards.py), and
each run is one byte range [offsets[first], offsets[first+count]) of its shard, from the
per-sample offsets of index.json: an HTTP range request on s3:// or http://, a seek locally.
Runs of upcoming micro-batches that are adjacent in a shard (one rank; a worker's group of
consecutive micro-batches) are fetched as ONE larger read of up to MAX_READ_BYTES (`Extent`):
a server spends CPU per request, and object stores give bandwidth to concurrent requests, not
to one long stream (`ReadAhead`). Separate from loader.py because this is the I/O policy alone;
what the bytes mean (samples, images, bad shards) is the loader's business. ShardStream._schedule
walks the micro-batches and applies `Extent.take`; both keep their underscore names because
bench/loader.py reaches them as loader.Extent.
"""
from __future__ import annotations

import queue as queue_mod
import threading
from concurrent.futures import Future


class ReadAhead:
    """A few daemon threads running range reads. Daemon, unlike ThreadPoolExecutor's: a read
    still retrying against a dead server must not hold up interpreter exit."""

    def __init__(self, threads: int):
        self.threads = threads
        self._jobs: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._queued: set[Future] = set()  # submitted, not yet finished: what close() cancels
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [threading.Thread(target=self._run, name=f"etsdm-read-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._workers:
            t.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the consumer
                    fut.set_exception(e)
            with self._lock:
                self._queued.discard(fut)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("read-ahead is closed")
            self._queued.add(fut)
        self._jobs.put((fut, fn, args))
        return fut

    def close(self, wait_s: float = 5.0) -> None:
        """No read starts after this returns: queued reads are cancelled, and reads already
        running get up to `wait_s` to finish (a read retrying against a dead server is left to
        its daemon thread). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fut in self._queued:
                fut.cancel()  # False for a running read: that one is waited for below
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            if t is not threading.current_thread():
                t.join(wait_s)


MAX_READ_BYTES = 32 << 20  # the largest coalesced range read (one extent)


class Extent:
    """One range read [lo, hi) of shard `shard`: the spans of one or more upcoming micro-batches
    of this worker. `seq` numbers extents in read order."""

    __slots__ = ("seq", "shard", "lo", "hi", "fut")

    def __init__(self, seq: int, shard: int, lo: int, hi: int):
        self.seq, self.shard, self.lo, self.hi, self.fut = seq, shard, lo, hi, None

    def take(self, shard: int, lo: int, hi: int, max_bytes: int) -> bool:
        """Grow to cover the span [lo, hi) if the coalescing rule allows it.

        The rule: same shard, the span starts exactly at the extent's end, and the extent stays
        within max_bytes (or the span is alone). Only adjacent spans merge: with the plan of
        shards.py that is one rank's or one worker's consecutive micro-batches. A gap is always
        another rank's or worker's samples, and even a small one is never read (sample sizes vary,
        so a "small gap" rule let a short micro-batch of another rank slip into a read).
        """
        gap = lo - self.hi
        if shard != self.shard or gap != 0 or hi - self.lo > max_bytes:
            return False
        self.hi = hi
        return True
