"""Tiny text-to-image configs and one precomputed folder for the performance tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from mmdiff.config import load_config

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp: Path, shards: Path, **data: Any) -> Path:
    """The demo text-to-image config shrunk to seconds (random VAE, tiny U-Net, 16 px)."""
    cfg: Dict[str, Any] = {
        "base": [str(REPO / "configs/demo/text_to_image.yaml")],
        "run_dir": str(tmp / "run"),
        "model": {
            "vae": {"pretrained": None, "block_out_channels": [32, 32], "scale_estimate_batches": 1},
            "clip": {"pretrained": None},
            "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8, "use_pooled_text": True},
            "ema_decay": 0.9,
        },
        "data": {"train_shards": str(shards / "train-00000[01].tar"),
                 "val_shards": str(shards / "val-*.tar"),
                 "batch_size": 8, "val_batch_size": 50, "num_workers": 0, "steps_per_epoch": 4,
                 "image_size": 16, **data},
        "sampling": {"prompts": ["a handwritten digit one", "a handwritten digit two"], "steps": 2,
                     "every_n_steps": 0},
        "trainer": {"max_steps": 4, "val_every_n_steps": 4, "limit_val_batches": 1,
                    "checkpoint_every_n_steps": 4, "log_every_n_steps": 1, "enable_progress_bar": False},
        "logger": {"kind": "csv"},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_cfg_path(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    return tiny_config(tmp_path_factory.mktemp("tiny"), demo_shards)


@pytest.fixture(scope="session")
def precomputed(tmp_path_factory: pytest.TempPathFactory, tiny_cfg_path: Path) -> Path:
    """The tiny config's train (2 shards) and val shards, precomputed once."""
    from mmdiff.jobs.precompute import precompute

    out = tmp_path_factory.mktemp("latents")
    precompute(load_config(tiny_cfg_path), out, progress=False, batch_size=64)
    return out
