"""A 2-D Gaussian mixture whose noised distributions are known in closed form.

For data ``Σ_k π_k N(μ_k, s² I)`` and ``x_t = a x_0 + b ε`` (a = √ᾱ, b = √(1-ᾱ)), the noised density
is ``Σ_k π_k N(a μ_k, (a²s² + b²) I)`` and the exact posterior mean is
``E[x_0 | x_t] = Σ_k r_k(x_t) (μ_k + a s²/(a²s² + b²) (x_t - a μ_k))`` with responsibilities r_k.
So the ideal ε / x_0 / v predictor is available without training: samplers can be checked
against the true distribution (``sliced_wasserstein``, ``mode_weights``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from mmdiff.diffusion.objectives import eps_from_x0, v_from
from mmdiff.diffusion.schedules import NoiseSchedule


class GaussianMixture2D:
    """``n_modes`` isotropic Gaussians of std ``std`` evenly placed on a circle of ``radius``."""

    def __init__(
        self,
        n_modes: int = 8,
        radius: float = 1.0,
        std: float = 0.05,
        weights: Optional[Sequence[float]] = None,
    ) -> None:
        angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
        self.means = radius * torch.stack([angles.cos(), angles.sin()], 1)
        w = torch.ones(n_modes, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.std = float(std)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n samples (float64)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[comp] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    def posterior_mean(self, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        """E[x_0 | x_t] for per-sample ᾱ (shape (B,) or scalar)."""
        x = x_t.to(torch.float64)
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1, 1, 1)
        a = ab.sqrt()
        var = ab * self.std**2 + (1 - ab)
        diff = x[:, None, :] - a * self.means[None]  # (B, K, 2)
        logits = self.weights.log()[None] - (diff**2).sum(-1) / (2 * var[:, :, 0])
        resp = torch.softmax(logits, dim=1)[..., None]
        comp_mean = self.means[None] + (a * self.std**2 / var) * diff
        return (resp * comp_mean).sum(1).to(x_t.dtype)

    def model(self, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> Callable[..., Tensor]:
        """The exact network ``model_fn(x_t, t, cond=None)`` for ``schedule`` and ``prediction_type``.

        Fractional timesteps read ᾱ through :meth:`NoiseSchedule.alpha_bar_at`.
        """

        def model_fn(x_t: Tensor, t: Tensor, cond: Optional[dict] = None) -> Tensor:
            t = torch.as_tensor(t).expand(x_t.shape[0])
            ab = schedule.alpha_bar_at(t.double()).to(torch.float64)
            x0 = self.posterior_mean(x_t, ab)
            abx = ab.reshape(-1, 1).to(x_t.dtype)
            if prediction_type == "sample":
                return x0
            eps = eps_from_x0(x_t, x0, abx)
            return eps if prediction_type == "epsilon" else v_from(x0, eps, abx)

        return model_fn

    def mode_weights(self, x: Tensor) -> Tensor:
        """Fraction of samples nearest to each mode."""
        d = ((x.to(torch.float64)[:, None, :] - self.means[None]) ** 2).sum(-1)
        return torch.bincount(d.argmin(1), minlength=len(self.weights)).double() / x.shape[0]


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point sets (random unit directions)."""
    if a.shape != b.shape:
        raise ValueError("sliced_wasserstein needs two point sets of the same shape.")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ dirs).sort(0)
    pb, _ = (b.double() @ dirs).sort(0)
    return float((pa - pb).abs().mean())
