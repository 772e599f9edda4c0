"""Pooled element moments of latents across batches and ranks (the latent-scale estimate)."""
from __future__ import annotations

import torch


def moments(z: torch.Tensor) -> torch.Tensor:
    """``[count, mean, M2]`` of ``z``'s elements (``M2 = Σ(z - mean)²``), float64 on the CPU.

    The sums run in float32 on ``z``'s device about the tensor's own mean, which keeps them
    accurate without float64 there (MPS has none; on GPUs it is slow).
    """
    z = z.detach().float()
    mean = z.mean()
    m2 = (z - mean).square().sum()
    centred = torch.stack([mean, m2]).cpu().double()
    return torch.cat([torch.tensor([float(z.numel())], dtype=torch.float64), centred])


def pool_moments(rows: torch.Tensor) -> torch.Tensor:
    """The ``[count, mean, M2]`` of the union of groups given as rows ``[count, mean, M2]``
    (Chan et al.'s parallel combination), in float64 on the CPU."""
    n, mean, m2 = rows.reshape(-1, 3).cpu().double().unbind(1)
    total = n.sum()
    grand = (n * mean).sum() / total
    return torch.stack([total, grand, (m2 + n * (mean - grand).square()).sum()])
