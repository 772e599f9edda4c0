"""Who reads what: disjoint training streams per (rank, worker), balanced validation blocks.

Training — every (rank, worker) *slot* reads its own disjoint part of the data and resamples
endlessly within it, so within (and across) epochs no two slots ever yield the same sample:

* ``shards``: at least ranks×workers shards — slot ``s = rank*workers + worker`` owns shards
  ``s, s + S, s + 2S, ...`` (``S`` = number of slots). Each shard is read by one slot only.
* ``rank-shards``: at least ``ranks`` shards but fewer than slots — a rank owns shards
  ``rank, rank + R, ...`` and its workers split every shard at sample level (worker ``w`` takes
  sample positions ``w, w + W, ...``). Each shard is read by the ``W`` workers of one rank.
* ``samples``: fewer shards than ranks — every slot reads every shard and takes positions
  ``s, s + S, ...``. Correct but costs ``S``× the reading; write more shards instead.

Validation — the shards are listed once (keys per shard, from tar headers), the samples are
numbered 0..N-1 in shard order and slot ``s`` reads the contiguous block ``[s*N//S, (s+1)*N//S)``,
then pads with flagged placeholders to ``ceil(N/S)`` samples. Every slot therefore makes the same
number of batches, every rank the same number of batches (no DDP hang on uneven shards), and each
sample is read exactly once per pass. With aspect-ratio buckets a slot batches its block shape by
shape and pads with one-placeholder batches to a batch count fixed by the number of buckets
(:func:`val_batches_per_slot`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple


@dataclass(frozen=True)
class TrainSlot:
    """The shards one (rank, worker) reads, and which sample positions of each it keeps."""

    shard_ids: Tuple[int, ...]
    stride: int  # keep positions p with p % stride == offset
    offset: int
    mode: str  # "shards" | "rank-shards" | "samples"

    def keeps(self, pos: int) -> bool:
        return pos % self.stride == self.offset


def train_slot(num_shards: int, rank: int, world: int, worker: int, num_workers: int) -> TrainSlot:
    """The training slot of (rank, worker) given the number of shards (see module docstring)."""
    if num_shards < 1:
        raise ValueError("no training shards")
    num_workers = max(1, num_workers)
    slots = world * num_workers
    slot = rank * num_workers + worker
    if num_shards >= slots:
        return TrainSlot(tuple(range(slot, num_shards, slots)), 1, 0, "shards")
    if num_shards >= world:
        return TrainSlot(tuple(range(rank, num_shards, world)), num_workers, worker, "rank-shards")
    return TrainSlot(tuple(range(num_shards)), slots, slot, "samples")


def batches_for_worker(total: int, worker: int, num_workers: int) -> int:
    """This worker's share of ``total`` batches (the DataLoader interleaves workers round-robin)."""
    num_workers = max(1, num_workers)
    return total // num_workers + (1 if worker < total % num_workers else 0)


@dataclass(frozen=True)
class ValBlock:
    """A slot's validation work: (shard id, first position, end position) ranges, then padding."""

    ranges: Tuple[Tuple[int, int, int], ...]
    padding: int

    @property
    def size(self) -> int:
        return sum(end - start for _, start, end in self.ranges) + self.padding


def val_block(shard_sizes: Sequence[int], rank: int, world: int, worker: int, num_workers: int) -> ValBlock:
    """The contiguous block of validation samples of (rank, worker), padded to the common size."""
    num_workers = max(1, num_workers)
    slots = world * num_workers
    slot = rank * num_workers + worker
    total = sum(shard_sizes)
    lo, hi = slot * total // slots, (slot + 1) * total // slots
    ranges: List[Tuple[int, int, int]] = []
    first = 0
    for shard_id, size in enumerate(shard_sizes):
        start, end = max(lo, first), min(hi, first + size)
        if start < end:
            ranges.append((shard_id, start - first, end - first))
        first += size
    return ValBlock(tuple(ranges), per_slot_samples(total, slots) - (hi - lo))


def per_slot_samples(total: int, slots: int) -> int:
    """Samples (real + padding) each validation slot yields."""
    return max(1, math.ceil(total / max(1, slots)))


def val_batches_per_slot(total: int, slots: int, batch_size: int, shapes: int = 1) -> int:
    """Validation batches every slot yields per pass when its samples come in up to ``shapes``
    shapes (aspect-ratio buckets) batched shape by shape: ``n`` samples in ``shapes`` one-shape
    groups make at most ``ceil(n / batch_size) + shapes - 1`` batches, and never more than ``n``."""
    per_slot = per_slot_samples(total, slots)
    return min(per_slot, math.ceil(per_slot / batch_size) + max(1, shapes) - 1)


def val_batches_per_rank(total: int, world: int, num_workers: int, batch_size: int, shapes: int = 1) -> int:
    """Validation batches every rank yields per pass (see :func:`val_batches_per_slot`)."""
    num_workers = max(1, num_workers)
    return num_workers * val_batches_per_slot(total, world * num_workers, batch_size, shapes)
