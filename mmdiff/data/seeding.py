"""Cheap, seeded randomness for the data streams: a 64-bit integer hash (splitmix64 chained).

The training stream draws shuffle-buffer slots from ``mix(seed, rank, worker, generation, ..., i)``
rather than from a stateful generator, so a stream's state at a batch boundary is a few counters.
"""
from __future__ import annotations

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 64-bit hash of a sequence of integers (splitmix64 chained): cheap, seeded randomness."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK))
    return h
