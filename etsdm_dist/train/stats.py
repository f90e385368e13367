"""Training statistics: what the loop reports, where it goes, and small measurement helpers.

`LossAccumulator` keeps float64 sums (overall loss, per-timestep bucket, the E-TSDM region
[0, t_tilde)) on the training device; `reduce()` all-reduces them in one collective, so every
report line describes all ranks. `StatsLog` appends one JSON object per report to stats.jsonl on
rank 0 (and TensorBoard if installed and asked for). When the run directory is remote (s3://) the
file is kept in a local mirror and uploaded atomically with each checkpoint. On resume the lines
past the resumed image counter are dropped, so a replayed interval is never reported twice.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import Any

import torch

from etsdm_dist import dist
from etsdm_dist.data import storage


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_max_allocated(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return 0


class LossAccumulator:
    """Sums over a report interval; all tensors float64 on `device`."""

    def __init__(self, num_buckets: int, device: torch.device):
        self.num_buckets = num_buckets
        self.device = device
        self.reset()

    def reset(self) -> None:
        # [loss_sum, count, early_sum, early_count, bucket sums..., bucket counts...]
        self.buf = torch.zeros(4 + 2 * self.num_buckets, dtype=torch.float64, device=self.device)
        self.edges: torch.Tensor | None = None

    def add(self, buckets) -> None:
        """`buckets` is loss.BucketStats for the valid samples of one micro-batch."""
        nb = self.num_buckets
        self.buf[0] += buckets.sums.sum()
        self.buf[1] += buckets.counts.sum()
        self.buf[2] += buckets.early_sum
        self.buf[3] += buckets.early_count
        self.buf[4:4 + nb] += buckets.sums
        self.buf[4 + nb:] += buckets.counts
        self.edges = buckets.edges

    def reduce(self) -> dict:
        """All-reduce across ranks (collective: call on every rank) and summarize."""
        buf = dist.all_reduce(self.buf.clone(), "sum").cpu()
        nb = self.num_buckets

        def mean(s, c):
            return float(s / c) if c > 0 else None

        out: dict[str, Any] = {
            "loss": mean(buf[0], buf[1]),
            "samples": int(buf[1]),
            "loss_early": mean(buf[2], buf[3]),
            "loss_late": mean(buf[0] - buf[2], buf[1] - buf[3]),
        }
        edges = self.edges.cpu().tolist() if self.edges is not None else [None] * (nb + 1)
        out["loss_buckets"] = [
            {"t0": edges[i], "t1": edges[i + 1], "loss": mean(buf[4 + i], buf[4 + nb + i]),
             "count": int(buf[4 + nb + i])} for i in range(nb)]
        return out


class Stopwatch:
    """Accumulates seconds spent in named phases (data wait, checkpoint, sampling)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def pop(self, name: str) -> float:
        return self.totals.pop(name, 0.0)

    class _Ctx:
        def __init__(self, sw, name):
            self.sw, self.name = sw, name

        def __enter__(self):
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            self.sw.add(self.name, time.perf_counter() - self.t0)

    def time(self, name: str) -> "_Ctx":
        return Stopwatch._Ctx(self, name)


def _finite(x):
    """JSON has no NaN / Inf: write them as strings so the line stays parseable."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


class StatsLog:
    """stats.jsonl (+ optional TensorBoard) on rank 0; a no-op object on other ranks."""

    def __init__(self, run_dir: str, *, resume_images: int, enabled: bool, tensorboard: bool = False,
                 local_mirror: str | None = None):
        self.enabled = enabled
        self.remote_path = storage.join(run_dir, "stats.jsonl") if storage.is_remote(run_dir) else None
        if storage.is_remote(run_dir):
            self.path = os.path.join(local_mirror or _default_mirror(run_dir), "stats.jsonl")
        else:
            self.path = os.path.join(run_dir, "stats.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._truncate(resume_images)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(os.path.dirname(self.path), "tensorboard"))
            except ImportError:
                print("etsdm train: train.tensorboard=true but tensorboard is not installed; "
                      "writing stats.jsonl only", flush=True)

    def _truncate(self, resume_images: int) -> None:
        """Keep only lines at or before the resumed image counter (fetch the remote copy first)."""
        lines: list[str] = []
        if self.remote_path is not None and storage.exists(self.remote_path):
            lines = storage.read_bytes(self.remote_path).decode().splitlines()
        elif os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("images", 0) <= resume_images:
                    kept.append(line)
            except json.JSONDecodeError:
                pass  # a line torn by a crash
        with open(self.path, "w") as f:
            f.write("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_finite(record)) + "\n")
        if self.tb is not None:
            step = record["images"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "images":
                    self.tb.add_scalar(k, v, step)
            for b in record.get("loss_buckets", []):
                if b["loss"] is not None:
                    self.tb.add_scalar(f"loss_t/{b['t0']:g}-{b['t1']:g}", b["loss"], step)
            self.tb.flush()

    def sync(self) -> None:
        """Upload the local mirror to a remote run directory (called with each checkpoint)."""
        if self.enabled and self.remote_path is not None and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                storage.write_bytes_atomic(self.remote_path, f.read())

    def close(self) -> None:
        self.sync()
        if self.tb is not None:
            self.tb.close()


def _default_mirror(run_dir: str) -> str:
    import hashlib

    tag = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
    return os.path.join(os.environ.get("ETSDM_LOCAL_DIR", os.path.join("runs", "_remote")), tag)


def progress_line(images: int, total_images: int, loss: float | None, img_s: float) -> str:
    loss_s = f"{loss:.4f}" if loss is not None else "n/a"
    return f"kimg {images / 1000:.3f}/{total_images / 1000:.3f} loss {loss_s} {img_s:.1f} img/s"
