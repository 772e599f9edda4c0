"""Noise schedules: β tables, ᾱ_t, SNR, σ, log-SNR and the forward process q(x_t | x_0).

Conventions (those of diffusers and improved-diffusion): timesteps are integers ``t ∈ [0, T)``,
``ᾱ_t = Π_{s≤t} (1 - β_s)``, so ``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε`` and even ``t = 0`` carries a little
noise; the clean sample sits "before" ``t = 0``. The VE noise level of a timestep is
``σ_t = √((1-ᾱ_t)/ᾱ_t)`` (k-diffusion / diffusers' Euler schedulers), ``SNR_t = ᾱ_t / (1-ᾱ_t)``.
Tables are float64 on the CPU; values are cast to the data's dtype and device when used.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid", "custom")
COSINE_S = 0.008
MAX_BETA = 0.999


def cosine_alpha_bar(u: Union[Tensor, float], s: float = COSINE_S) -> Union[Tensor, float]:
    """Nichol & Dhariwal's continuous ``f(u) = cos²((u+s)/(1+s)·π/2)`` for ``u ∈ [0, 1]``.

    The discrete cosine schedule has ``ᾱ_t = f((t+1)/T) / f(0)`` (until β hits its 0.999 cap).
    """
    if isinstance(u, Tensor):
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(
    kind: str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    betas: Optional[Sequence[float]] = None,
) -> Tensor:
    """The β table (float64) of a named schedule, matching diffusers' definitions.

    ``linear``: β linear in t; ``scaled_linear``: √β linear (Stable Diffusion); ``cosine``:
    Nichol & Dhariwal (diffusers' ``squaredcos_cap_v2``), β capped at 0.999; ``sigmoid``:
    ``sigmoid(linspace(-6, 6)) · (β_end - β_start) + β_start``; ``custom``: the given ``betas``.
    """
    if kind == "custom" or (betas is not None and len(betas) > 0):
        if betas is None or len(betas) < 2:
            raise ValueError("a custom beta schedule needs a list of at least two betas.")
        out = torch.tensor(list(betas), dtype=torch.float64)
    elif kind == "linear":
        out = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    elif kind == "scaled_linear":
        out = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    elif kind == "cosine":
        out = torch.tensor(
            [
                min(1 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps),
                    MAX_BETA)
                for i in range(num_timesteps)
            ],
            dtype=torch.float64,
        )
    elif kind == "sigmoid":
        ramp = torch.linspace(-6, 6, num_timesteps, dtype=torch.float64)
        out = torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"unknown beta schedule '{kind}'; choose one of: {', '.join(SCHEDULES)}.")
    if not bool(((out > 0) & (out <= 1)).all()):
        raise ValueError("every beta must lie in (0, 1].")
    return out


def betas_from_alphas_bar(alphas_bar: Tensor) -> Tensor:
    """Invert the cumulative product: ``β_t = 1 - ᾱ_t/ᾱ_{t-1}`` with ``ᾱ_{-1} = 1``."""
    prev = torch.cat([alphas_bar.new_ones(1), alphas_bar[:-1]])
    return 1 - alphas_bar / prev


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that ᾱ_{T-1} = 0 and ᾱ_0 is unchanged."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    return betas_from_alphas_bar(alphas_bar_sqrt**2)


def shift_snr(betas: Tensor, shift: float) -> Tensor:
    """Resolution shift (Hoogeboom et al. 2023): ``SNR'(t) = SNR(t) / shift²``.

    ``shift`` = (training resolution) / (resolution the schedule was designed for); > 1 adds noise.
    """
    if shift == 1.0:
        return betas
    ab = torch.cumprod(1 - betas, 0)
    ab_shifted = ab / (ab + shift**2 * (1 - ab))
    return betas_from_alphas_bar(ab_shifted)


def continuous_alpha_bar(
    kind: str, u: Tensor, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000
) -> Tensor:
    """Continuous-time ᾱ(u), ``u ∈ [0, 1]``, of which the discrete table is a sampling.

    ``linear``/``scaled_linear``: the VP-SDE limit ``exp(-∫₀ᵘ T·β(v) dv)``; ``cosine``: f(u)/f(0).
    """
    u = u.to(torch.float64)
    if kind == "linear":
        integral = beta_start * u + 0.5 * (beta_end - beta_start) * u**2
        return torch.exp(-num_timesteps * integral)
    if kind == "scaled_linear":
        a, b = beta_start**0.5, beta_end**0.5 - beta_start**0.5
        integral = ((a + b * u) ** 3 - a**3) / (3 * b) if b != 0 else a**2 * u
        return torch.exp(-num_timesteps * integral)
    if kind == "cosine":
        return cosine_alpha_bar(u) / cosine_alpha_bar(0.0)
    raise ValueError(f"no continuous-time form for the '{kind}' schedule; use linear, scaled_linear or cosine.")


def expand_like(values: Tensor, x: Tensor) -> Tensor:
    """Per-sample values (B,) viewed as (B, 1, ..., 1) in x's dtype and device."""
    return values.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class NoiseSchedule:
    """A discrete VP noise schedule and its forward process.

    Build with :meth:`make` (named schedule + options) or directly from a β table.
    """

    def __init__(self, betas: Tensor, alphas_cumprod: Optional[Tensor] = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 2:
            raise ValueError("a noise schedule needs at least two timesteps.")
        self.betas = betas
        self.alphas = 1 - betas
        if alphas_cumprod is None:
            self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        else:
            self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) (improved-diffusion's names).
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1 - ab_prev) / (1 - ab)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * ab_prev.sqrt() / (1 - ab)
        self.posterior_mean_coef2 = (1 - ab_prev) * self.alphas.sqrt() / (1 - ab)
        # p(x_{t-1} | x_t) log-variances: β (with β̃_1 at t = 0, as improved-diffusion) and log β.
        self.log_variance_fixed_large = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))
        self.log_betas = torch.log(betas)
        self._device_tables: dict = {}

    def lookup(self, table: Tensor, t: Union[Tensor, int]) -> Tensor:
        """``table[t]`` for integer timesteps, on t's device (tables are copied once per device)."""
        t = torch.as_tensor(t)
        t = t.long() if t.dtype != torch.long else t
        if t.device.type == "cpu":
            return table[t]
        key = (id(table), t.device)
        cached = self._device_tables.get(key)
        if cached is None:
            dtype = torch.float32 if t.device.type == "mps" else table.dtype  # MPS has no float64
            cached = self._device_tables[key] = table.to(device=t.device, dtype=dtype)
        return cached[t]

    @classmethod
    def make(
        cls,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        betas: Optional[Sequence[float]] = None,
        zero_terminal_snr: bool = False,
        resolution_shift: float = 1.0,
    ) -> "NoiseSchedule":
        """Named schedule, then the resolution shift, then (optionally) zero terminal SNR."""
        table = make_betas(kind, num_timesteps, beta_start, beta_end, betas)
        table = shift_snr(table, resolution_shift)
        if zero_terminal_snr:
            table = rescale_zero_terminal_snr(table)
        return cls(table)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> "NoiseSchedule":
        """A schedule with exactly this ᾱ table (e.g. another library's, to compare samplers)."""
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        return cls(betas_from_alphas_bar(ab), alphas_cumprod=ab)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    # ---------------------------------------------------------------- per-timestep quantities
    def alpha_bar(self, t: Union[Tensor, int]) -> Tensor:
        """ᾱ_t for integer timesteps (float64)."""
        return self.lookup(self.alphas_cumprod, t)

    def snr(self, t: Union[Tensor, int]) -> Tensor:
        """SNR_t = ᾱ_t / (1 - ᾱ_t) (0 at a zero-terminal-SNR endpoint)."""
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def log_snr(self, t: Union[Tensor, int]) -> Tensor:
        """λ_t = log SNR_t."""
        ab = self.alpha_bar(t)
        return torch.log(ab) - torch.log1p(-ab)

    def sigma(self, t: Union[Tensor, int]) -> Tensor:
        """VE noise level σ_t = √((1-ᾱ_t)/ᾱ_t) (inf where ᾱ_t = 0)."""
        ab = self.alpha_bar(t)
        return ((1 - ab) / ab).sqrt()

    def log_sigmas(self, clamp_terminal: bool = True) -> Tensor:
        """log σ_t for all t; with ``clamp_terminal`` a zero ᾱ_{T-1} is read as 2⁻²⁴ (diffusers)."""
        ab = self.alphas_cumprod.clone()
        if clamp_terminal and ab[-1] < 2**-24:
            ab[-1] = 2**-24
        return 0.5 * (torch.log1p(-ab) - torch.log(ab))

    def alpha_bar_at(self, t: Union[Tensor, float]) -> Tensor:
        """ᾱ at fractional timesteps, interpolating log σ linearly (inverse of ``sigma_to_t``)."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0, self.num_timesteps - 1)
        log_sigmas = self.log_sigmas()
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
        ab = torch.sigmoid(-2 * log_sigma)
        exact = t == t.round()
        return torch.where(exact, self.alphas_cumprod[t.round().long()], ab)

    # ---------------------------------------------------------------------- forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Closed form ``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε`` for per-sample integer t (shape (B,))."""
        ab = expand_like(self.alpha_bar(t), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def q_step(self, x_prev: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """One forward step ``x_t = √(1-β_t) x_{t-1} + √β_t ε`` (x_{-1} is the clean sample)."""
        beta = expand_like(self.lookup(self.betas, t), x_prev)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            expand_like(self.lookup(self.posterior_mean_coef1, t), x_t) * x0
            + expand_like(self.lookup(self.posterior_mean_coef2, t), x_t) * x_t
        )
        return mean, expand_like(self.lookup(self.posterior_log_variance_clipped, t), x_t)
