"""DataStatsCallback under a real (single-process) Lightning fit: skip counts reach the metrics."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from datakit import data_cfg, img2dataset_sample, mixed_aspect_shards, write_tar
from mmdiff.callbacks.data_stats import DataStatsCallback
from mmdiff.data.datamodule import ShardDataModule


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.val_keys: list[str] = []
        self.train_keys: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.train_keys.setdefault(self.current_epoch, []).extend(batch["key"])
        return self.lin(batch["image"].mean(dim=(2, 3))).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_keys += [k for k, ok in zip(batch["key"], batch["valid"].tolist()) if ok]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.timeout(120)
def test_skip_counts_are_logged_during_fit(tmp_path: Path) -> None:
    samples = [img2dataset_sample(f"{i:05d}", i) for i in range(10)]
    samples[3] = ("bad01", {"jpg": b"not an image", "txt": b"x"})
    samples[7] = img2dataset_sample("bad02", 7, caption=False)
    shard = write_tar(tmp_path / "s.tar", samples)
    cfg = data_cfg(train_shards=[str(shard)], val_shards=[str(shard)], batch_size=4, val_batch_size=3,
                   steps_per_epoch=3, num_workers=2, shuffle_buffer=0)
    model, stats = _Tiny(), DataStatsCallback()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[stats], num_sanity_val_steps=0)
    dm = ShardDataModule(cfg, seed=0)
    trainer.fit(model, datamodule=dm)
    assert dm.state_dict() == {"next_train_epoch": 2}
    # the workers' streams continue across epochs under Lightning (no restart from the same seed)
    assert len(model.train_keys[0]) == len(model.train_keys[1]) == 12
    assert model.train_keys[0] != model.train_keys[1]
    assert trainer.callback_metrics["data/skipped_val"].item() == 2
    assert trainer.callback_metrics["data/skipped_train"].item() == stats.skipped_train >= 2
    assert sorted(model.val_keys) == sorted([k for k, _ in samples if not k.startswith("bad")] * 2)
    assert stats.state_dict() == {"skipped_train": stats.skipped_train, "ranks": [stats.skipped_train]}


@pytest.mark.timeout(120)
def test_bucket_shares_are_logged_during_fit(tmp_path: Path) -> None:
    paths, _ = mixed_aspect_shards(tmp_path, 40, shards=2, seed=1)
    cfg = data_cfg(train_shards=[str(p) for p in paths], batch_size=2, steps_per_epoch=12, num_workers=0,
                   buckets={"enabled": True, "step": 8})
    shapes: list[tuple[int, int]] = []

    class Recording(_Tiny):
        def training_step(self, batch, batch_idx):
            height, width = batch["image"].shape[2:]
            shapes.extend([(width, height)] * len(batch["key"]))
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[DataStatsCallback()], num_sanity_val_steps=0)
    trainer.fit(Recording(), datamodule=ShardDataModule(cfg, seed=0))
    metrics = trainer.callback_metrics
    for width, height in [(24, 40), (32, 32), (40, 24)]:
        share = shapes.count((width, height)) / len(shapes)
        assert metrics[f"data/bucket_share/{width}x{height}"].item() == pytest.approx(share, abs=1e-6)
    seen = Counter(shapes)
    assert len(seen) == 3 and seen[24, 40] != seen[40, 24]  # (width, height) and (height, width) differ
