"""unCLIP measurements on the digits: variation accuracy and distance, prior vs text cosines.

Works on tensors and callables only (never imports a system):

- :func:`read_shards` — images (3×S×S in [-1, 1]), captions and digit labels of webdataset shards;
- :func:`variation_scores` — how often variations of an image of digit d are judged d by the
  independent SVC (:mod:`mmdiff.eval.digit_judge`), and their mean pixel distance to the source;
- :func:`mean_pixel_distance` — mean |a − b| per pixel on the [0, 1] scale.

"Not a copy" is judged against the distance a copy would have: the decoder's VAE reproduces an
image only up to its reconstruction error, so a variation counts as new when its mean distance to
the source is at least twice the VAE round-trip distance of the same sources (the threshold the
demo reports beside the value).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mmdiff.data.decode import DecodeSpec
from mmdiff.data.reference import usable_samples
from mmdiff.data.transforms import ImageTransform
from mmdiff.eval.digit_judge import classify_digits

VaryFn = Callable[[torch.Tensor, int, int], torch.Tensor]  # (image 3×H×W, n, seed) → n×3×H×W


def read_shards(shards: str | Sequence[str], size: int, limit: Optional[int] = None) -> Tuple[torch.Tensor, List[str], List[int]]:
    """``(images N×3×S×S, captions, labels)`` of the shards' samples (label -1 when none is stored)."""
    transform = ImageTransform(size)
    images: List[torch.Tensor] = []
    captions: List[str] = []
    labels: List[int] = []
    for raw, sample in usable_samples(shards, DecodeSpec()):
        if limit is not None and len(images) >= limit:
            break
        meta = json.loads(raw.members["json"]) if "json" in raw.members else {}
        images.append(transform(sample.image))
        captions.append(sample.caption)
        labels.append(int(meta.get("label", -1)))
    return torch.stack(images), captions, labels


def mean_pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute pixel difference of [-1, 1] images, on the [0, 1] scale."""
    return ((a.float() - b.float()).abs() / 2).flatten(1).mean(dim=1)


def variation_scores(vary: VaryFn, images: torch.Tensor, labels: Sequence[int], n: int, seed: int = 0) -> Dict[str, Any]:
    """``n`` variations per source image: judged digit accuracy and mean distance to the source."""
    correct, distances, grids = [], [], []
    for i, (image, label) in enumerate(zip(images, labels)):
        out = vary(image, n, seed + i).cpu()
        correct.append(classify_digits(out) == label)
        distances.append(mean_pixel_distance(out, image.expand_as(out)))
        grids.append(torch.cat([image.unsqueeze(0), out]))
    return {
        "accuracy": float(np.concatenate(correct).mean()),
        "distance": float(torch.cat(distances).mean()),
        "n": int(len(images) * n),
        "grid": torch.cat(grids),  # per source: the source, then its variations
    }


__all__ = ["read_shards", "variation_scores", "mean_pixel_distance"]
