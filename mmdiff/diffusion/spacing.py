"""Sampling grids: which timesteps / noise levels a sampler visits.

Every sampler walks a :class:`Grid` of ``N`` model evaluations points plus a final clean level:
``timesteps[i]`` is what the network sees, ``alphas_bar[i]`` / ``sigmas[i]`` the noise level of the
sample there, and ``alphas_bar[N] = 1`` (``sigmas[N] = 0``) is the clean end point.

Timestep spacing follows diffusers (Lin et al. 2023, Table 2), with ``T`` training steps and ``N``
sampling steps:

* ``linspace``: ``round(linspace(0, T-1, N))`` reversed (Euler/Heun keep the fractional values);
* ``leading``: ``arange(N) · (T // N) + steps_offset`` reversed — ``steps_offset`` shifts only
  this spacing (Stable Diffusion uses 1, so its last step is t = 1, not 0);
* ``trailing``: ``round(arange(T, 0, -T/N)) - 1`` — starts at t = T-1, the only spacing that
  reaches a zero-terminal-SNR endpoint.

Each sampler family reproduces its diffusers scheduler: DDPM/DDIM (``discrete`` grid),
Euler/Heun (``euler``: σ interpolated linearly between integer timesteps; ``euler_karras``:
Karras ρ=7 σs between the σs of the first and last spaced timesteps) and DPM-Solver multistep
(``dpm``: its own spacings over N+1 points; ``dpm_karras``: Karras σs over the full training range,
timesteps rounded). Where ᾱ_{T-1} = 0 (zero terminal SNR) the σ-based grids read it as 2⁻²⁴ like
diffusers, so σ_max is finite (4096).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mmdiff.diffusion.options import TIMESTEP_SPACINGS as SPACINGS
from mmdiff.diffusion.schedules import NoiseSchedule

GRID_KINDS = ("discrete", "euler", "euler_karras", "dpm", "dpm_karras")


@dataclass(frozen=True)
class Grid:
    """Model timesteps (N,) and noise levels (N+1,) of one sampling run; the last level is clean.

    ``timesteps[i]`` belongs to level ``i``; a one-step sub-grid may carry ``t_{i+1}`` as well.
    """

    timesteps: Tensor
    alphas_bar: Tensor
    sigmas: Tensor

    @classmethod
    def from_alphas_bar(cls, timesteps: Tensor, alphas_bar: Tensor) -> "Grid":
        ab = torch.cat([alphas_bar.to(torch.float64), torch.ones(1, dtype=torch.float64)])
        return cls(timesteps, ab, ((1 - ab) / ab).sqrt())

    @classmethod
    def from_sigmas(cls, timesteps: Tensor, sigmas: Tensor) -> "Grid":
        sig = torch.cat([sigmas.to(torch.float64), torch.zeros(1, dtype=torch.float64)])
        return cls(timesteps, 1 / (1 + sig**2), sig)

    def __len__(self) -> int:
        """Number of steps (noise levels minus the clean end point)."""
        return int(self.alphas_bar.numel()) - 1

    def step(self, i: int) -> "Grid":
        """The one-step grid from level ``i`` to level ``i + 1`` (keeps t_{i+1} for Heun)."""
        return Grid(self.timesteps[i : i + 2], self.alphas_bar[i : i + 2], self.sigmas[i : i + 2])

    def end_at(self, alpha_bar: float) -> "Grid":
        """The same grid whose last level is ``alpha_bar`` instead of clean (DDIM's
        ``set_alpha_to_one=False``: diffusers then steps last to ᾱ of timestep 0)."""
        ab = self.alphas_bar.clone()
        ab[-1] = float(alpha_bar)
        return Grid(self.timesteps, ab, ((1 - ab) / ab).sqrt())

    def tail(self, start: int) -> "Grid":
        """The grid from step ``start`` on (img2img starts part-way down the schedule)."""
        return Grid(self.timesteps[start:], self.alphas_bar[start:], self.sigmas[start:])


def spaced_timesteps(
    num_train: int, steps: int, spacing: str = "leading", steps_offset: int = 0, *, fractional: bool = False
) -> np.ndarray:
    """DDPM/DDIM/Euler timestep spacing (descending, float64 values).

    ``fractional`` keeps ``linspace`` values unrounded (Euler/Heun schedulers do).
    """
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps)
        if not fractional:
            ts = ts.round()
        return ts[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        ratio = num_train / steps
        return np.round(np.arange(num_train, 0, -ratio)).astype(np.float64) - 1
    raise ValueError(f"unknown timestep spacing '{spacing}'; choose one of: {', '.join(SPACINGS)}.")


def dpm_timesteps(num_train: int, steps: int, spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """DPM-Solver multistep spacing: like :func:`spaced_timesteps` but over N+1 points, last dropped."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps + 1).round()[::-1][:-1].astype(np.float64)
    if spacing == "leading":
        ratio = num_train // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return spaced_timesteps(num_train, steps, "trailing")
    raise ValueError(f"unknown timestep spacing '{spacing}'; choose one of: {', '.join(SPACINGS)}.")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 noise levels: ρ-th-root-linear from ``sigma_max`` down to ``sigma_min``."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of noise levels, interpolating linearly in log σ (k-diffusion)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def _check_steps(schedule: NoiseSchedule, steps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise ValueError(f"steps must be an integer, got {steps!r}.")
    if steps <= 0 or steps > schedule.num_timesteps:
        raise ValueError(
            f"steps must be between 1 and the {schedule.num_timesteps} training timesteps, got {steps}."
        )


def make_grid(
    schedule: NoiseSchedule, kind: str, steps: int, spacing: str = "leading", steps_offset: int = 0
) -> Grid:
    """The sampling grid of a sampler family (see the module docstring for each kind)."""
    _check_steps(schedule, steps)
    T = schedule.num_timesteps
    if kind == "discrete":
        ts = spaced_timesteps(T, steps, spacing, steps_offset).astype(np.int64)
        _check_range(ts, T)
        ts_t = torch.from_numpy(ts)
        return Grid.from_alphas_bar(ts_t, schedule.alphas_cumprod[ts_t])
    log_sigmas = schedule.log_sigmas().numpy()
    all_sigmas = np.exp(log_sigmas)
    if kind in ("euler", "euler_karras"):
        ts = spaced_timesteps(T, steps, spacing, steps_offset, fractional=True)
        _check_range(ts, T)
        sigmas = np.interp(ts, np.arange(T), all_sigmas)
        if kind == "euler_karras":
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
            ts = sigma_to_t(sigmas, log_sigmas)
        return Grid.from_sigmas(torch.from_numpy(ts.copy()), torch.from_numpy(sigmas.copy()))
    if kind == "dpm":
        ts = dpm_timesteps(T, steps, spacing, steps_offset).astype(np.int64)
        _check_range(ts, T)
        sigmas = all_sigmas[ts]
        return Grid.from_sigmas(torch.from_numpy(ts.copy()), torch.from_numpy(sigmas.copy()))
    if kind == "dpm_karras":
        sigmas = karras_sigmas(float(all_sigmas[0]), float(all_sigmas[-1]), steps)
        ts = sigma_to_t(sigmas, log_sigmas).round().astype(np.int64)
        return Grid.from_sigmas(torch.from_numpy(ts), torch.from_numpy(sigmas.copy()))
    raise ValueError(f"unknown grid kind '{kind}'; choose one of: {', '.join(GRID_KINDS)}.")


def _check_range(ts: np.ndarray, num_train: int) -> None:
    if ts.size and (ts.max() > num_train - 1 or ts.min() < 0):
        raise ValueError(
            f"the spaced timesteps reach {ts.max():g}, beyond the last training timestep {num_train - 1}; "
            "lower steps_offset or the number of steps."
        )
