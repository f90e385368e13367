"""Randomness keyed by position, not by layout: a sample's flip, noise and timestep come from its
global position, an image's sampling noise from its index, so results do not depend on the number
of ranks, the micro-batch or a resume. Self-contained on purpose: a library RNG could change its
stream between versions and silently change a resumed run's data order."""
from __future__ import annotations

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One step of SplitMix64: a fast, well-mixed 64-bit hash, identical on every platform."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 64-bit hash of a sequence of integers (SplitMix64 folded over them)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = splitmix64(h ^ (v & MASK64))
    return h


def seed63(*values: int) -> int:
    """A torch.Generator seed in [0, 2^63) from integers."""
    return mix(*values) & ((1 << 63) - 1)
