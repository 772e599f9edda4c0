"""Variational bound pieces (Ho et al. 2020; Nichol & Dhariwal 2021): Gaussian KLs, the
discretised Gaussian decoder, and the learned-range variance.

All per-element quantities are in nats; :func:`mean_flat` and a division by ``log 2`` turn them
into bits per dimension.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOG2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=list(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor, bins: int = 256) -> Tensor:
    """log P(x) per element for data on ``bins`` levels in [-1, 1] under N(means, e^{2 log_scales}).

    Each level owns a bin of width 2/(bins-1); the extreme bins extend to ±∞ (Ho et al. 2020).
    Uses the exact normal CDF in log space for stability.
    """
    half = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + half)
    lower = inv_std * (x - means - half)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    # log(Φ(upper) - Φ(lower)), computed on the side of the mean with less cancellation.
    # Both branches are clamped away from log(0) so that torch.where has finite gradients.
    right = -torch.expm1(torch.special.log_ndtr(-upper) - log_one_minus_cdf_lower)
    left = -torch.expm1(torch.special.log_ndtr(lower) - log_cdf_upper)
    mid = torch.where(
        lower > 0,
        log_one_minus_cdf_lower + torch.log(right.clamp(min=1e-30)),
        log_cdf_upper + torch.log(left.clamp(min=1e-30)),
    )
    edge = 1.0 - 1e-3
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_one_minus_cdf_lower, mid))


def learned_range_log_variance(v: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
    """Interpolate log σ² between ``min_log`` (β̃) and ``max_log`` (β) with ``(v+1)/2``."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log
