"""Reconstruction metrics on image tensors in [-1, 1]: PSNR and SSIM.

Both take two B×C×H×W tensors, score each image separately and return the mean over the batch
as a 0-dim float tensor (on the inputs' device), so they can be logged directly.

We call ``torchmetrics.functional`` rather than re-deriving the formulas: its SSIM is the
reference Gaussian-window formulation (Wang et al. 2004; same numbers as scikit-image with
``gaussian_weights=True``), it is tested against those references, runs on any device and
handles per-image reduction — a hand-rolled SSIM is an easy place to get padding or constants
subtly wrong.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


def _check(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"expected B×C×H×W image batches, got shape {tuple(a.shape)}")
    return a.detach().float(), b.detach().float()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean over the batch of per-image PSNR in dB (``inf`` for identical images).

    ``data_range`` is max − min of the pixel range: 2.0 for images in [-1, 1].
    """
    a, b = _check(a, b)
    per_image = peak_signal_noise_ratio(
        a, b, data_range=data_range, reduction="none", dim=(1, 2, 3)
    )
    return per_image.mean()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean over the batch of per-image SSIM (1.0 for identical images).

    Standard settings: 11×11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03. Images should
    be at least 11 pixels on each side.
    """
    a, b = _check(a, b)
    per_image = structural_similarity_index_measure(
        a,
        b,
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        reduction="none",
        data_range=data_range,
        k1=0.01,
        k2=0.03,
    )
    return per_image.mean()


__all__ = ["psnr", "ssim"]
