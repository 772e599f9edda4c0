"""FID and KID between two image sets, with any named feature extractor.

Both go through torchmetrics (``FrechetInceptionDistance`` / ``KernelInceptionDistance``), which
accept a custom ``nn.Module`` as the feature network: the standard Inception and the CLIP fallback
(:mod:`mmdiff.eval.features`) share the same, tested Fréchet/MMD code. Images are B×3×H×W in
[-1, 1]; each extractor resizes/normalises them itself.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch
from torch import Tensor, nn


def _feed(metric, images: Tensor, real: bool, batch_size: int, device: torch.device) -> None:
    for start in range(0, images.shape[0], batch_size):
        metric.update(images[start : start + batch_size].to(device), real=real)


def _check(real: Tensor, fake: Tensor) -> None:
    for what, x in (("real", real), ("generated", fake)):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{what} images must be N×3×H×W, got shape {tuple(x.shape)}.")
        if x.shape[0] < 2:
            raise ValueError(f"FID/KID need at least 2 {what} images, got {x.shape[0]}.")


@torch.no_grad()
def frechet_distance(real: Tensor, fake: Tensor, extractor: nn.Module, batch_size: int = 64) -> float:
    """FID of ``fake`` against ``real`` in ``extractor``'s feature space."""
    # Imported here: torchmetrics' image metrics are slow to import; only FID/KID runs need them.
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check(real, fake)
    device = next(extractor.parameters(), torch.empty(0)).device
    metric = FrechetInceptionDistance(feature=extractor.eval()).to(device)
    _feed(metric, real, True, batch_size, device)
    _feed(metric, fake, False, batch_size, device)
    return float(metric.compute())


@torch.no_grad()
def kernel_distance(
    real: Tensor, fake: Tensor, extractor: nn.Module, batch_size: int = 64, subsets: int = 100,
    subset_size: int = 1000,
) -> Tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets) of ``fake`` against ``real``.

    ``subset_size`` is capped at the smaller set's size (torchmetrics needs it ≤ both).
    """
    # Imported here: torchmetrics' image metrics are slow to import; only FID/KID runs need them.
    from torchmetrics.image.kid import KernelInceptionDistance

    _check(real, fake)
    size = min(subset_size, real.shape[0], fake.shape[0])
    device = next(extractor.parameters(), torch.empty(0)).device
    with warnings.catch_warnings():  # "will save all extracted features": intended here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=extractor.eval(), subsets=subsets, subset_size=size).to(device)
    _feed(metric, real, True, batch_size, device)
    _feed(metric, fake, False, batch_size, device)
    mean, std = metric.compute()
    return float(mean), float(std)


__all__ = ["frechet_distance", "kernel_distance"]
