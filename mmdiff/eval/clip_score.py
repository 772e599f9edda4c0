"""CLIP score (Hessel et al. 2021): 100 · mean over pairs of max(cos(image, text), 0).

Written here rather than taken from torchmetrics' ``CLIPScore``: that one only loads Hugging Face
``transformers`` CLIP checkpoints, while mmdiff scores with the configured open_clip model (for
the demo, the contrastive CLIP trained on the digits). Same formula and scale (w = 100).
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def clip_score(
    images: Tensor,
    prompts: Sequence[str],
    encode_image: Callable[[Tensor], Tensor],
    encode_text: Callable[[List[str]], Tensor],
    batch_size: int = 64,
) -> float:
    """CLIP score of images (N×3×H×W in [-1, 1]) against their prompts (N strings).

    ``encode_image`` / ``encode_text`` return embeddings (normalised here).
    """
    if images.shape[0] != len(prompts) or not len(prompts):
        raise ValueError(f"clip_score needs one prompt per image, got {images.shape[0]} images and {len(prompts)} prompts.")
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        img = F.normalize(encode_image(images[start : start + batch_size]).float(), dim=-1)
        txt = F.normalize(encode_text(list(prompts[start : start + batch_size])).float().to(img.device), dim=-1)
        total += float((100 * (img * txt).sum(-1)).clamp(min=0).sum())
    return total / len(prompts)


__all__ = ["clip_score"]
