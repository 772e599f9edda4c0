"""Toy-size configs and the ``toy`` system shared by the test folders (import with ``tests/`` on
``sys.path``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
import yaml
from torch import nn

from mmdiff.systems.base import System
from mmdiff.systems.registry import register_system

REPO = Path(__file__).resolve().parents[1]


def tiny_t2i_config(tmp_path: Path, shards: Path, run: str = "run", **sections: Dict[str, Any]) -> Path:
    """The demo text-to-image config at toy size (random VAE, 16 px, tiny U-Net), CSV logging.

    ``sections`` are merged one level deep into the config (``trainer={...}``, ``data={...}``).
    """
    cfg: Dict[str, Any] = {
        "base": [str(REPO / "configs/demo/text_to_image.yaml")],
        "run_dir": str(tmp_path / run),
        "model": {
            "vae": {"pretrained": None, "block_out_channels": [32, 32], "scale_estimate_batches": 1},
            "clip": {"pretrained": None},
            "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8},
            "ema_decay": 0.9,
        },
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "batch_size": 4, "val_batch_size": 8, "num_workers": 0, "steps_per_epoch": 7,
                 "image_size": 16, "shuffle_buffer": 20},
        "sampling": {"prompts": ["a handwritten digit one"], "steps": 2, "every_n_steps": 100000},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 10, "val_every_n_steps": 100000, "limit_val_batches": 1,
                    "checkpoint_every_n_steps": 100000, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "accelerator": "cpu", "devices": "1"},
        "logger": {"kind": "csv"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)  # one level deep: a section's sub-dicts are replaced
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@register_system("toy")
class ToySystem(System):
    """Predicts an image's mean brightness from its colour means: enough to exercise the wiring."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.head = nn.Linear(3, 1)
        self.save_config()

    def _loss(self, batch) -> torch.Tensor:
        x = batch["image"].mean(dim=(2, 3))
        return (self.head(x).squeeze(1) - x.mean(1)).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), sync_dist=True, batch_size=len(batch["caption"]))
