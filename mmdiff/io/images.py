"""Tensor ↔ image helpers: [-1, 1] tensors to PIL images, PNG files and grids."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from mmdiff.io.atomic import AtomicFile


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B×C×H×W in [-1, 1] → B×H×W×C uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """B×C×H×W in [-1, 1] → list of RGB (or L for one channel) PIL images."""
    arr = to_uint8(images)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def grid(images: torch.Tensor, nrow: int = 8) -> Image.Image:
    """One PIL image tiling a batch in [-1, 1]."""
    g = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=1.0)
    return to_pil(g.unsqueeze(0))[0]


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (temp file, then rename) and return its path."""
    # No fsync: sample folders hold thousands of PNGs, and a killed process still leaves whole files.
    with AtomicFile(path, fsync=False) as f:
        image.save(f, format="PNG")
    return Path(path)
