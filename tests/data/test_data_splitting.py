"""Who reads what: training slots are disjoint and cover everything; validation blocks balance."""
from __future__ import annotations

import itertools

import pytest

from mmdiff.data.splitting import batches_for_worker, train_slot, val_batches_per_rank, val_block


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 1), (2, 2), (3, 2), (4, 3)])
def test_train_slots_are_disjoint_and_cover_all_samples(num_shards, world, workers) -> None:
    positions = range(12)  # sample positions inside each shard
    owners = {}
    for rank, worker in itertools.product(range(world), range(max(1, workers))):
        slot = train_slot(num_shards, rank, world, worker, workers)
        for shard, pos in itertools.product(slot.shard_ids, positions):
            if slot.keeps(pos):
                assert (shard, pos) not in owners, f"{(shard, pos)} read by {owners[(shard, pos)]} and {(rank, worker)}"
                owners[(shard, pos)] = (rank, worker)
    assert len(owners) == num_shards * len(positions)


def test_train_split_modes() -> None:
    assert train_slot(8, 1, 2, 1, 2).mode == "shards"
    assert train_slot(8, 1, 2, 1, 2).shard_ids == (3, 7)
    assert train_slot(3, 0, 2, 1, 2).mode == "rank-shards"
    assert train_slot(3, 0, 2, 1, 2).shard_ids == (0, 2)
    assert train_slot(1, 1, 2, 0, 2).mode == "samples"


def test_batches_for_workers_sum_to_total() -> None:
    for total, workers in itertools.product(range(0, 9), range(0, 4)):
        assert sum(batches_for_worker(total, w, workers) for w in range(max(1, workers))) == total


@pytest.mark.parametrize("sizes", [[5, 17, 40], [1], [3, 0, 2], [100], [7, 7]])
@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2), (3, 1), (4, 4)])
def test_val_blocks_read_each_sample_once_and_balance(sizes, world, workers) -> None:
    seen = []
    slot_sizes = set()
    for rank, worker in itertools.product(range(world), range(max(1, workers))):
        block = val_block(sizes, rank, world, worker, workers)
        slot_sizes.add(block.size)
        for shard, start, end in block.ranges:
            assert 0 <= start < end <= sizes[shard]
            seen.extend((shard, p) for p in range(start, end))
    assert sorted(seen) == [(s, p) for s, n in enumerate(sizes) for p in range(n)]
    assert len(slot_sizes) == 1  # every slot yields the same number of samples (real + padding)
    bs = 4
    per_rank = val_batches_per_rank(sum(sizes), world, workers, bs)
    assert per_rank == max(1, workers) * -(-slot_sizes.pop() // bs)
