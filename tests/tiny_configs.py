"""Toy-size configs, the ``toy`` system and tools/*.py as modules, shared by the test folders (import
with ``tests/`` on ``sys.path``)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
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
    return _write(tmp_path / f"{run}.yaml", cfg, sections)


def toy_config(tmp_path: Path, shards: Path, run: str = "run", **sections: Any) -> Path:
    """An experiment of the ``toy`` system below on the demo shards: batches of 8, 4 per epoch, 6 steps,
    validation (1 batch) and checkpoints every 3 steps, CSV logging. ``sections`` as in tiny_t2i_config,
    and a plain value sets a top-level key (``name="exp"``).

    A shuffle buffer of 20: the default 1000 reads (untars) a thousand samples before the first batch,
    most of a toy fit's CPU time."""
    cfg: Dict[str, Any] = {
        "name": "toy",
        "system": "toy",
        "run_dir": str(tmp_path / run),
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "batch_size": 8, "num_workers": 0, "steps_per_epoch": 4, "shuffle_buffer": 20},
        "trainer": {"max_steps": 6, "accelerator": "cpu", "devices": "1", "val_every_n_steps": 3,
                    "limit_val_batches": 1, "checkpoint_every_n_steps": 3, "log_every_n_steps": 1,
                    "enable_progress_bar": False},
        "logger": {"kind": "csv"},
    }
    return _write(tmp_path / f"{run}.yaml", cfg, sections)


def _write(path: Path, cfg: Dict[str, Any], sections: Dict[str, Dict[str, Any]]) -> Path:
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)  # one level deep: a section's sub-dicts are replaced
        else:
            cfg[name] = values  # a top-level key (name=...)
    path.write_text(yaml.safe_dump(cfg))
    return path


def add_fit_callback(monkeypatch: Any, callback: Any) -> None:
    """``mmdiff fit`` (mmdiff.run.training) adds ``callback`` after its own callbacks, for this test."""
    import mmdiff.run.training as training

    build_callbacks = training.build_callbacks
    monkeypatch.setattr(training, "build_callbacks", lambda *a, **k: [*build_callbacks(*a, **k), callback])


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


def load_tool(name: str) -> ModuleType:
    """tools/``name``.py as a module (tools/ is not a package), registered in ``sys.modules`` so that
    its dataclasses work."""
    spec = importlib.util.spec_from_file_location(f"mmdiff_tool_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
