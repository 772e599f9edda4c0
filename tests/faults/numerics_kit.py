"""A tiny registered system whose loss turns NaN on chosen steps, and its config (numerics tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Set

import torch
import yaml
from torch import nn

from mmdiff.systems.base import System
from mmdiff.systems.optim import configure_adamw
from mmdiff.systems.registry import register_system


@register_system("faulty_toy")
class FaultyToy(System):
    """Regresses an image's mean from its colour means; the loss is NaN on ``bad_steps``."""

    bad_steps: Set[int] = set()  # global steps whose loss is NaN (set by the tests)
    loss_scale: float = 1.0  # multiplies the loss (large values overflow fp16 gradients)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.head = nn.Linear(3, 1)
        self.save_config()

    @property
    def ema_target(self) -> nn.Module:
        return self.head

    def _loss(self, batch) -> torch.Tensor:
        x = batch["image"].mean(dim=(2, 3))
        return (self.head(x).squeeze(1).float() - x.mean(1)).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch) * self.loss_scale
        if self.global_step in self.bad_steps:
            loss = loss * float("nan")
        self.log("train/loss", loss, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), batch_size=len(batch["caption"]))

    def configure_optimizers(self):
        return configure_adamw(self.parameters(), self.cfg.optim, self.cfg.trainer.max_steps,
                               fused=self.cfg.trainer.fused_adamw)


def toy_config(tmp_path: Path, shards: Path, trainer: Optional[Dict[str, Any]] = None,
               **sections: Any) -> Path:
    """Write a ``faulty_toy`` experiment YAML (CSV logger, run dir under ``tmp_path``)."""
    cfg: Dict[str, Any] = {
        "name": "faulty",
        "system": "faulty_toy",
        "run_dir": str(tmp_path / "run"),
        "data": {
            "train_shards": str(shards / "train-*.tar"),
            "val_shards": str(shards / "val-*.tar"),
            "batch_size": 8, "num_workers": 0, "steps_per_epoch": 50, "shuffle_buffer": 0,
        },
        "trainer": {"max_steps": 6, "accelerator": "cpu", "devices": "1", "val_every_n_steps": 100,
                    "limit_val_batches": 1, "checkpoint_every_n_steps": 3, "log_every_n_steps": 1,
                    "enable_progress_bar": False, **(trainer or {})},
        "model": {"ema_decay": 0.9},
        "optim": {"lr": 0.01, "warmup_steps": 0, "schedule": "constant"},
        "logger": {"kind": "csv"},
    }
    cfg.update(sections)
    path = tmp_path / "faulty.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
