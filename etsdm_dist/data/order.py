"""Which samples, for which rank and worker, in which order: pure functions, no I/O.

The data stream is one infinite global sequence of samples. Epoch e visits every shard once,
in a permutation that depends only on (seed, e), each shard's samples in stored order; epoch
e+1 follows immediately. A global position p (0-based image counter over the whole run) maps to
(epoch, shard, sample) through cumulative counts, so everything below is a function of
(shard sizes, seed, position) and a run resumes from one integer.

Batches cut this sequence into consecutive global batches of B images. Within global batch k,
micro-step a of rank r takes the b positions at offset (a*W + r)*b. Concatenating the global
batches gives the same sequence for any world size W, accumulation A or worker count K, so a
resume with a different W from the image cursor still sees every remaining sample exactly once.
Batches straddle epoch boundaries instead of dropping or padding: every rank always gets the
same number of full micro-batches and no rank can run short and hang the collective.

Dataloader worker w of K produces the rank's micro-batches j with (j // G) % K == w, as DataLoader
items of G consecutive micro-batches (G = 1 unless the loader groups them to read bigger byte
ranges); torch's DataLoader (batch_size=None) polls workers round-robin and therefore yields the
items, and so j = 0, 1, 2, ..., in order.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

from etsdm_dist.seeds import mix, splitmix64

def epoch_permutation(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of one epoch: a Fisher-Yates shuffle driven by a hash of (seed, epoch).

    Self-contained on purpose: a library RNG could change its stream between versions and
    silently change the data order of a resumed run.
    """
    perm = list(range(num_shards))
    state = mix(seed, epoch, 0x5EED)
    for i in range(num_shards - 1, 0, -1):
        state = splitmix64(state)
        j = state % (i + 1)  # bias ~ i / 2**64: irrelevant
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def hflip(seed: int, position: int) -> bool:
    """Whether the sample at this global position is mirrored: reproducible on resume."""
    return bool(mix(seed, position, 0xF11B) & 1)


@dataclass(frozen=True)
class Span:
    """`count` consecutive samples of shard `shard` starting at sample `first`, which sit at the
    consecutive global positions `position`, `position + 1`, ... (within epoch `epoch`)."""

    epoch: int
    shard: int
    first: int
    count: int
    position: int


class ShardPlan:
    """Position -> (epoch, shard, sample) for fixed shard sizes and seed (per-epoch tables cached)."""

    def __init__(self, shard_samples: Sequence[int], seed: int):
        self.shard_samples = tuple(int(n) for n in shard_samples)
        if not self.shard_samples or any(n < 0 for n in self.shard_samples):
            raise ValueError(f"shard sample counts must be >= 0 and non-empty: {self.shard_samples[:8]}")
        self.epoch_samples = sum(self.shard_samples)
        if self.epoch_samples == 0:
            raise ValueError("the shards hold no samples")
        self.seed = int(seed)
        self._tables: dict[int, tuple[list[int], list[int]]] = {}

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        table = self._tables.get(epoch)
        if table is None:
            if len(self._tables) >= 4:  # positions only move forward: keep a few recent epochs
                self._tables.pop(min(self._tables))
            perm = epoch_permutation(len(self.shard_samples), self.seed, epoch)
            cum = [0]
            for s in perm:
                cum.append(cum[-1] + self.shard_samples[s])
            table = self._tables[epoch] = (perm, cum)
        return table

    def order(self, epoch: int) -> list[int]:
        return list(self._epoch(epoch)[0])

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, shard index, sample index within the shard) of a global position. O(log shards)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        epoch, q = divmod(position, self.epoch_samples)
        perm, cum = self._epoch(epoch)
        i = bisect.bisect_right(cum, q) - 1  # the last shard starting at or before q: skips empty ones
        return epoch, perm[i], q - cum[i]

    def spans(self, positions: range) -> list[Span]:
        """Cover a contiguous run of positions with contiguous runs inside shards, in order."""
        if positions.step != 1:
            raise ValueError("positions must be a contiguous range")
        out: list[Span] = []
        p, stop = positions.start, positions.stop
        while p < stop:
            epoch, shard, first = self.locate(p)
            count = min(stop - p, self.shard_samples[shard] - first)
            out.append(Span(epoch, shard, first, count, p))
            p += count
        return out


def spans(shard_samples: Sequence[int], seed: int, positions: range) -> list[Span]:
    """Functional form of `ShardPlan(shard_samples, seed).spans(positions)`."""
    return ShardPlan(shard_samples, seed).spans(positions)


def check_batch_geometry(batch_images: int, world_size: int, micro_batch_images: int) -> int:
    """Validate B = W * A * b and return the accumulation steps A."""
    if world_size < 1 or micro_batch_images < 1 or batch_images < 1:
        raise ValueError(
            f"batch sizes must be positive: batch_images={batch_images}, world_size={world_size}, "
            f"micro_batch_images={micro_batch_images}")
    per_step = world_size * micro_batch_images
    if batch_images % per_step:
        raise ValueError(
            f"train.batch_images={batch_images} must be a multiple of world_size * micro_batch_images "
            f"= {world_size} * {micro_batch_images} = {per_step}")
    return batch_images // per_step


def rank_micro_batch_positions(start: int, j: int, batch_images: int, world_size: int, rank: int,
                               micro_batch_images: int) -> range:
    """Global positions of rank `rank`'s j-th micro-batch (0-based, counted from `start`)."""
    accum = check_batch_geometry(batch_images, world_size, micro_batch_images)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    k, a = divmod(j, accum)
    base = start + k * batch_images + (a * world_size + rank) * micro_batch_images
    return range(base, base + micro_batch_images)


def worker_micro_batches(worker: int, num_workers: int, group: int = 1) -> Iterator[int]:
    """Micro-batch indices j produced by dataloader worker `worker` of `num_workers` (0 = 1):
    the worker owns the groups of `group` consecutive micro-batches g = j // group with
    g % num_workers == worker. It yields each group as one DataLoader item, so the round-robin
    DataLoader still outputs groups, and hence micro-batches, in the order 0, 1, 2, ..."""
    k, g = max(1, num_workers), max(1, group)
    j = worker * g
    while True:
        yield from range(j, j + g)
        j += k * g


def position_after(start: int, micro_batches: int, batch_images: int, world_size: int,
                   micro_batch_images: int) -> int:
    """The resume cursor once every rank has consumed `micro_batches` micro-batches: only complete
    global batches count (a half-accumulated batch is replayed after a resume)."""
    accum = check_batch_geometry(batch_images, world_size, micro_batch_images)
    return start + (micro_batches // accum) * batch_images
