"""Toy base models and LoRA systems for the LoRA tests (imported by name: no conftest clash)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mmdiff.config import load_config

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a handwritten digit one", "a handwritten digit seven"]
TINY = ["model.vae.pretrained=null", "model.vae.block_out_channels=[32,32]", "model.clip.pretrained=null",
        "model.unet.block_out_channels=[32,32]", "model.unet.attention_head_dim=8", "data.image_size=16",
        "sampling.steps=3", "sampling.guidance_scale=2.0", "model.vae.scaling_factor=0.7"]


def tiny_config(overrides: Sequence[str] = ()):
    """The demo text-to-image architecture shrunk (random VAE/CLIP/U-Net, 8×8 latents)."""
    return load_config(REPO / "configs/demo/text_to_image.yaml", [*TINY, *overrides])


def base_system(seed: int = 0):
    """A tiny text_to_image system with no zero weights (a fresh U-Net's conv_out is all zero)."""
    from mmdiff.systems.text_to_image import TextToImageSystem

    torch.manual_seed(seed)
    system = TextToImageSystem(tiny_config())
    with torch.no_grad():
        for p in system.unet.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return system.eval()


def write_base_checkpoint(system, path: Path) -> Path:
    """A text_to_image checkpoint (no EMA) as ``model.init_from`` reads it."""
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams), "global_step": 3}, path)
    return path


def lora_overrides(base_ckpt: Path, rank: int = 4, text_encoder: bool = False, alpha: float = 8.0) -> list:
    return [f"model.init_from={base_ckpt}", f"model.lora.rank={rank}", f"model.lora.alpha={alpha}",
            f"model.lora.text_encoder={str(text_encoder).lower()}"]


def lora_system(base_ckpt: Path, rank: int = 4, text_encoder: bool = False, seed: int = 1, b_std: float = 0.05,
                overrides: Sequence[str] = ()):
    """A tiny LoRA system on the base checkpoint, its adapters' B set to random values (a fresh
    one is zero, which would make every adapter a no-op)."""
    from mmdiff.models.lora import lora_parameters
    from mmdiff.systems.text_to_image import TextToImageSystem

    torch.manual_seed(seed)
    system = TextToImageSystem(tiny_config([*lora_overrides(base_ckpt, rank, text_encoder), *overrides]))
    with torch.no_grad():
        for p in lora_parameters(system):
            if not p.abs().sum():
                p.normal_(0, b_std)
    return system.eval()
