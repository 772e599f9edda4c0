"""The training data resumes exactly: a stream restored from a saved position continues the batch
sequence of an uninterrupted stream — keys, pixels (augmentations), the sizes and crop offsets
recorded with them, and skip counts — whatever the
number of workers, the point of interruption (mid-pass, any worker's turn), the shuffle buffer and
corrupt samples. No Lightning here (tests/scale/test_exact_resume.py does the real fit)."""
from __future__ import annotations

import logging

from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch

from datakit import data_cfg, image_bytes, img2dataset_sample, mixed_aspect_shards, sized_shards, write_tar
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.data.streams import POSITION_KEY


def _take(loader, n: int) -> List[Dict[str, Any]]:
    """The next ``n`` batches, pass after pass (stops mid-pass like an interrupted run)."""
    out: List[Dict[str, Any]] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _sig(batches) -> List[Any]:
    return [(tuple(b["key"]), b["image"].sum().item(), int(b["worker"][0]),
             b["original_size"].tolist(), b["crop_top_left"].tolist()) for b in batches]


def _skips(batches) -> int:
    """Skipped samples behind these batches (per-worker running counts: max per worker, summed)."""
    last: Dict[int, int] = {}
    for b in batches:
        last[int(b["worker"][0])] = max(last.get(int(b["worker"][0]), 0), int(b["skipped"][0]))
    return sum(last.values())


def _resume(cfg, seed: int, stop: int, total: int, position_at: Optional[int] = None):
    first = ShardDataModule(cfg, seed=seed)
    loader = first.train_dataloader()
    head = _take(loader, stop)
    position = loader.position(position_at)
    second = ShardDataModule(cfg, seed=seed)
    second.restore_position(position)
    resumed = second.train_dataloader()
    start = stop if position_at is None else position_at
    return head[:start], _take(resumed, total - start), position


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> List[Path]:
    root = tmp_path_factory.mktemp("resume")
    paths = sized_shards(root, [9, 14, 6, 11, 8, 13])
    bad = [img2dataset_sample(f"bad{i:03d}", 100 + i) for i in range(10)]
    bad[2] = ("bad002", {"jpg": b"junk", "txt": b"broken"})
    bad[7] = ("bad007", {"jpg": b"junk", "txt": b"broken"})
    return paths + [write_tar(root / "part-bad.tar", bad)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers, stop", [(0, 5), (2, 5), (2, 8), (3, 10)])
def test_resumed_stream_continues_the_uninterrupted_one(shards, workers: int, stop: int) -> None:
    cfg = data_cfg(train_shards=[str(p) for p in shards], num_workers=workers, batch_size=3, image_size=16,
                   steps_per_epoch=7, shuffle_buffer=12, crop="random", random_flip=True, random_shift=2)
    total = 17  # 2 passes and a bit: the resumed run crosses pass boundaries too
    straight = _take(ShardDataModule(cfg, seed=3).train_dataloader(), total)
    head, tail, _ = _resume(cfg, 3, stop, total)
    assert _sig(head + tail) == _sig(straight)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, straight[stop:]))
    assert not any(POSITION_KEY in b for b in straight)  # the loader strips the position
    # corrupt samples are skipped (each time a round reads them) and counted once: a resumed
    # stream counts from zero again (DataStatsCallback adds the count saved in the checkpoint)
    assert _skips(straight) == _skips(head) + _skips(tail) >= 2


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers, stop", [(0, 7), (2, 9)])
def test_bucketed_stream_resumes_with_its_waiting_samples(tmp_path: Path, workers: int, stop: int) -> None:
    """With aspect-ratio buckets, samples wait in their bucket's buffer across batches: the position
    lists them and the resumed stream re-reads them into the same buffers."""
    paths, _ = mixed_aspect_shards(tmp_path, 36, shards=3)  # small: the rounds come round to the bad shard
    truncated = image_bytes(3, (40, 60))  # a readable header (its bucket is known), then broken data
    bad = write_tar(tmp_path / "bad.tar", [img2dataset_sample("ok0", 0), ("bad", {"jpg": b"junk", "txt": b"x"}),
                                           ("cut", {"jpg": truncated[:len(truncated) // 2], "txt": b"x"})])
    cfg = data_cfg(train_shards=[str(p) for p in paths + [bad]], num_workers=workers, batch_size=4, image_size=32,
                   steps_per_epoch=6, shuffle_buffer=10, crop="random", random_flip=True,
                   buckets={"enabled": True, "step": 8})
    total = 16
    straight = _take(ShardDataModule(cfg, seed=5).train_dataloader(), total)
    head, tail, position = _resume(cfg, 5, stop, total)
    assert all(len(slot["waiting"]) > 0 for slot in position["slots"])  # the case this test is about
    assert position["buckets"] == [[24, 40], [32, 32], [40, 24]]
    assert _sig(head + tail) == _sig(straight)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, straight[stop:]))
    assert len({b["image"].shape for b in straight}) > 1  # batches of several buckets
    assert all(len(b["key"]) == 4 and "cut" not in b["key"] for b in straight)
    assert _skips(straight) == _skips(head) + _skips(tail) >= 2  # the junk and the truncated image


@pytest.mark.timeout(120)
def test_position_one_batch_back(shards) -> None:
    """A checkpoint written while the last batch was still training (Lightning re-runs it)."""
    cfg = data_cfg(train_shards=[str(p) for p in shards], num_workers=2, batch_size=3, image_size=16,
                   steps_per_epoch=7, shuffle_buffer=12)
    straight = _take(ShardDataModule(cfg, seed=0).train_dataloader(), 12)
    head, tail, position = _resume(cfg, 0, stop=6, total=12, position_at=5)
    assert position["consumed"] == 5
    assert _sig(head + tail) == _sig(straight)


@pytest.mark.timeout(120)
def test_two_ranks_resume_their_own_streams(shards, monkeypatch) -> None:
    cfg = data_cfg(train_shards=[str(p) for p in shards], num_workers=2, batch_size=2, image_size=16,
                   steps_per_epoch=5, shuffle_buffer=8)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        straight = _take(ShardDataModule(cfg, seed=1).train_dataloader(), 9)
        head, tail, position = _resume(cfg, 1, stop=3, total=9)
        assert position["rank"] == rank and position["world"] == 2
        assert _sig(head + tail) == _sig(straight)


@pytest.mark.timeout(120)
def test_position_that_no_longer_fits_is_ignored(shards, caplog) -> None:
    cfg = data_cfg(train_shards=[str(p) for p in shards], num_workers=0, batch_size=3, image_size=16,
                   steps_per_epoch=4)
    loader = ShardDataModule(cfg, seed=0).train_dataloader()
    _take(loader, 3)
    position = loader.position()
    cfg.batch_size = 4
    dm = ShardDataModule(cfg, seed=0)
    dm.restore_position(position)
    with caplog.at_level(logging.WARNING, logger="mmdiff.data"):
        fresh = _take(dm.train_dataloader(), 2)
    assert _sig(fresh) == _sig(_take(ShardDataModule(cfg, seed=0).train_dataloader(), 2))
    assert "cannot resume the training data exactly (batch_size was 3 and is now 4)" in caplog.text


def test_position_is_checkpoint_safe(shards, tmp_path: Path) -> None:
    """Positions hold plain ints/lists/tensors only: torch.load(weights_only=True) reads them."""
    cfg = data_cfg(train_shards=[str(p) for p in shards], num_workers=0, batch_size=3, image_size=16,
                   steps_per_epoch=4, shuffle_buffer=12)
    loader = ShardDataModule(cfg, seed=0).train_dataloader()
    _take(loader, 2)
    torch.save({"ranks": [loader.position()]}, tmp_path / "p.pt")
    loaded = torch.load(tmp_path / "p.pt", weights_only=True)["ranks"][0]
    assert loaded["consumed"] == 2 and loaded["slots"][0]["buffer"].shape == (12, 2)
