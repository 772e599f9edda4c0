"""Toy text-to-image systems and checkpoints for the interop tests (imported by name: no conftest clash)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mmdiff.callbacks.ema import EMA_STATE_KEY
from mmdiff.config import load_config

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a handwritten digit one", "a handwritten digit seven"]


def tiny_config(overrides: Sequence[str] = (), **sampling):
    """The demo text-to-image architecture shrunk: random VAE/CLIP/U-Net, pooled text on;
    ``overrides`` are further ``key=value`` strings."""
    cfg = load_config(REPO / "configs/demo/text_to_image.yaml", [
        "model.vae.pretrained=null", "model.vae.block_out_channels=[32,32]",
        "model.clip.pretrained=null", "model.unet.block_out_channels=[32,32]",
        "model.unet.attention_head_dim=8", "model.unet.use_pooled_text=true", "data.image_size=16",
        "sampling.guidance_scale=3.0",
        *[f"sampling.{k}={v}" for k, v in sampling.items()], *overrides,
    ])
    return cfg


def tiny_system(seed: int = 0, overrides: Sequence[str] = (), **sampling):
    from mmdiff.systems.text_to_image import TextToImageSystem

    torch.manual_seed(seed)
    system = TextToImageSystem(tiny_config(overrides, **sampling))
    system.latent_scale.fill_(0.7)
    with torch.no_grad():  # a random U-Net's zero-initialised conv_out would make every output 0
        for p in system.ema_target.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return system.eval()


def write_checkpoint(system, path: Path, ema_shift: float = 0.01) -> Path:
    """A checkpoint as training writes it: config + VAE config hparams, state dict, EMA shadow."""
    params = [p for p in system.ema_target.parameters() if p.requires_grad]
    shadow = [p.detach().clone() + ema_shift for p in params]
    torch.save({
        "state_dict": system.state_dict(),
        "hyper_parameters": dict(system.hparams),
        "global_step": 7,
        "callbacks": {EMA_STATE_KEY: {"decay": 0.9, "num_updates": 7, "shadow": shadow}},
    }, path)
    return path
