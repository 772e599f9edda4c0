"""The real-scale configs build (architecture only, on the meta device: no memory, no download)."""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from mmdiff.config import load_config
from mmdiff.models.unet import build_unet

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config, latent", [("configs/sd/sd_256.yaml", 32), ("configs/sd/sd_512.yaml", 64)])
def test_sd_sized_unet_builds_for_the_clip_text_width(config: str, latent: int) -> None:
    cfg = load_config(REPO / config)
    text_width = open_clip.get_model_config(cfg.model.clip.name)["text_cfg"]["width"]
    with torch.device("meta"):
        unet = build_unet(cfg.model.unet, latent_channels=4, sample_size=latent, cross_attention_dim=text_width)
    params = sum(p.numel() for p in unet.parameters())
    assert 850e6 < params < 880e6  # SD 2's U-Net has 865.9M parameters
    assert unet.config.cross_attention_dim == text_width == 1024
    assert list(unet.config.attention_head_dim) == [5, 10, 20, 20]  # 64 channels per head
    assert cfg.data.train_shards[0].startswith("pipe:")
