"""Samplers: short functions over a denoiser (k-diffusion style).

Each sampler has the signature ``sampler(denoise, x, grid, *, generator, temperature, eta,
variance_type, on_step, progress) -> x_0``: ``denoise(x_t, t, ᾱ) -> Denoised`` (see
:mod:`mmdiff.diffusion.guidance`), ``x`` the starting sample at ``grid`` level 0 in VP form
(``√ᾱ x_0 + √(1-ᾱ) ε``), ``grid`` a :class:`~mmdiff.diffusion.spacing.Grid`. Arguments a sampler
has no use for are ignored (each takes ``**_unused``: ``eta`` only matters to DDIM,
``variance_type`` to DDPM, ``generator``/``temperature`` to the stochastic ones).
``temperature`` scales the noise injected during sampling (not the starting noise).
``on_step(x, i)`` is called with the VP sample once it reaches grid level ``i`` (1..N) and returns
the sample to continue from — inpainting and predictor-corrector steps hook in there.

DDPM and DDIM work on the VP sample like diffusers' DDPMScheduler/DDIMScheduler; Euler and Heun on
``x/√ᾱ = x_0 + σ ε`` (VE) like EulerDiscreteScheduler/HeunDiscreteScheduler; DPM-Solver++(2M)
like DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2, midpoint).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor
from tqdm.auto import trange

from mmdiff.diffusion.guidance import Denoised
from mmdiff.diffusion.objectives import randn_like
from mmdiff.diffusion.options import SAMPLER_TABLE
from mmdiff.diffusion.spacing import Grid

Denoise = Callable[[Tensor, Tensor, float], Denoised]
StepHook = Callable[[Tensor, int], Tensor]
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def _steps(n: int, progress: bool):
    return trange(n, disable=not progress, leave=False)


def sample_ddpm(
    denoise: Denoise,
    x: Tensor,
    grid: Grid,
    *,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    variance_type: str = "fixed_small",
    on_step: Optional[StepHook] = None,
    progress: bool = False,
    **_unused: Any,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020) on strided steps t → t' with ``β = 1 - ᾱ_t/ᾱ_t'``.

    Variance: ``fixed_small`` the posterior β̃ = (1-ᾱ_t')/(1-ᾱ_t)·β, ``fixed_large`` β,
    ``learned_range`` exp(v' log β + (1-v') log β̃) with v' = (v+1)/2 (Nichol & Dhariwal).
    No noise is added on the step that lands on the clean sample.
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance_type '{variance_type}'; choose one of: {', '.join(VARIANCE_TYPES)}.")
    ab = grid.alphas_bar.tolist()
    for i in _steps(len(grid), progress):
        a_t, a_p = ab[i], ab[i + 1]
        out = denoise(x, grid.timesteps[i], a_t)
        cur_alpha = a_t / a_p
        cur_beta = 1 - cur_alpha
        x = (math.sqrt(a_p) * cur_beta / (1 - a_t)) * out.x0 + (math.sqrt(cur_alpha) * (1 - a_p) / (1 - a_t)) * x
        if a_p < 1:  # no noise on the step that lands on the clean sample
            noise = randn_like(x, generator)
            small = max((1 - a_p) / (1 - a_t) * cur_beta, 1e-20)
            if variance_type == "learned_range":
                if out.var is None:
                    raise ValueError("variance_type 'learned_range' needs a model with 2x output channels.")
                frac = (out.var + 1) / 2
                log_var = frac * math.log(cur_beta) + (1 - frac) * math.log(small)
                x = x + torch.exp(0.5 * log_var) * (temperature * noise)
            else:
                var = cur_beta if variance_type == "fixed_large" else small
                x = x + math.sqrt(var) * temperature * noise
        if on_step is not None:
            x = on_step(x, i + 1)
    return x


def sample_ddim(
    denoise: Denoise,
    x: Tensor,
    grid: Grid,
    *,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    eta: float = 0.0,
    on_step: Optional[StepHook] = None,
    progress: bool = False,
    **_unused: Any,
) -> Tensor:
    """DDIM (Song et al. 2021): deterministic for η = 0, DDPM-like noise σ_t = η·√β̃ for η > 0.

    The previous timestep of each step is the next grid timestep (diffusers uses t - T//N, which
    differs for ``linspace`` and for ``trailing`` when N does not divide T).
    """
    ab = grid.alphas_bar.tolist()
    for i in _steps(len(grid), progress):
        a_t, a_p = ab[i], ab[i + 1]
        out = denoise(x, grid.timesteps[i], a_t)
        std = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        x = math.sqrt(a_p) * out.x0 + math.sqrt(max(1 - a_p - std**2, 0.0)) * out.eps
        if std > 0:
            x = x + std * temperature * randn_like(x, generator)
        if on_step is not None:
            x = on_step(x, i + 1)
    return x


class _VE:
    """Helpers to run a VE-form sampler (x/√ᾱ) against the VP denoiser and hooks."""

    def __init__(self, denoise: Denoise, grid: Grid, on_step: Optional[StepHook]) -> None:
        self.denoise, self.grid, self.on_step = denoise, grid, on_step
        self.sig = grid.sigmas.tolist()

    def __call__(self, x_ve: Tensor, i: int) -> Denoised:
        s = self.sig[i]
        return self.denoise(x_ve / math.sqrt(1 + s * s), self.grid.timesteps[i], 1 / (1 + s * s))

    def to_ve(self, x_vp: Tensor) -> Tensor:
        return x_vp * math.sqrt(1 + self.sig[0] ** 2)

    def hook(self, x_ve: Tensor, i: int) -> Tensor:
        if self.on_step is None:
            return x_ve
        scale = math.sqrt(1 + self.sig[i] ** 2)
        return self.on_step(x_ve / scale, i) * scale


def sample_euler(
    denoise: Denoise,
    x: Tensor,
    grid: Grid,
    *,
    on_step: Optional[StepHook] = None,
    progress: bool = False,
    **_unused: Any,
) -> Tensor:
    """Euler steps of the probability-flow ODE ``dx/dσ = (x - x̂_0)/σ`` (Karras et al. 2022, Alg. 1)."""
    ve = _VE(denoise, grid, on_step)
    x = ve.to_ve(x)
    for i in _steps(len(grid), progress):
        s, s_next = ve.sig[i], ve.sig[i + 1]
        d = (x - ve(x, i).x0) / s
        x = ve.hook(x + d * (s_next - s), i + 1)
    return x


def sample_heun(
    denoise: Denoise,
    x: Tensor,
    grid: Grid,
    *,
    on_step: Optional[StepHook] = None,
    progress: bool = False,
    **_unused: Any,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step to σ = 0 is Euler.

    N grid points cost 2N - 1 network evaluations.
    """
    ve = _VE(denoise, grid, on_step)
    x = ve.to_ve(x)
    for i in _steps(len(grid), progress):
        s, s_next = ve.sig[i], ve.sig[i + 1]
        d = (x - ve(x, i).x0) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - ve(x_euler, i + 1).x0) / s_next
            x = x + 0.5 * (d + d_next) * (s_next - s)
        x = ve.hook(x, i + 1)
    return x


def sample_dpmpp_2m(
    denoise: Denoise,
    x: Tensor,
    grid: Grid,
    *,
    on_step: Optional[StepHook] = None,
    progress: bool = False,
    **_unused: Any,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint form, on the VP sample.

    First step first-order, last step (to σ = 0) first-order, i.e. x = x̂_0, as diffusers.
    """
    sig = grid.sigmas.tolist()
    ab = grid.alphas_bar.tolist()
    prev_x0: Optional[Tensor] = None
    h_prev = 0.0
    for i in _steps(len(grid), progress):
        out = denoise(x, grid.timesteps[i], ab[i])
        s, s_next = sig[i], sig[i + 1]
        if s_next == 0:
            x = out.x0
        else:
            # VP: α = 1/√(1+σ²), σ_vp = σ α; λ = log(α/σ_vp) = -log σ.
            a_next = 1 / math.sqrt(1 + s_next**2)
            sv, sv_next = s / math.sqrt(1 + s**2), s_next * a_next
            h = math.log(s) - math.log(s_next)
            if prev_x0 is None:
                d = out.x0
            else:
                r = h_prev / h
                d = out.x0 + (0.5 / r) * (out.x0 - prev_x0)
            x = (sv_next / sv) * x - (a_next * math.expm1(-h)) * d
            h_prev = h
        prev_x0 = out.x0
        if on_step is not None:
            x = on_step(x, i + 1)
    return x


SamplerFn = Callable[..., Tensor]

#: Step function of each sampler family; :data:`mmdiff.diffusion.options.SAMPLER_TABLE` names the
#: samplers (``euler_karras`` and ``dpmpp_2m_karras`` reuse their family's function on a Karras grid).
_STEP_FUNCTIONS: Dict[str, SamplerFn] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
#: Sampler name -> function.
SAMPLERS: Dict[str, SamplerFn] = {name: _STEP_FUNCTIONS[step] for name, (step, _) in SAMPLER_TABLE.items()}


def check_sampler(name: str) -> None:
    """Raise ``ValueError`` naming the valid samplers if ``name`` is not one of them."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}.")


def langevin_corrector(
    denoise: Denoise,
    x: Tensor,
    t: Tensor,
    alpha_bar: float,
    *,
    steps: int,
    snr: float,
    alpha: float = 1.0,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
) -> Tensor:
    """Langevin MCMC at a fixed noise level (Song et al. 2021, Alg. 5 for the VP SDE).

    Score ``∇ log p = -ε̂/√(1-ᾱ)``; step ``ε = 2α (snr·‖z‖/‖∇‖)²`` with the norms averaged over
    the batch (as score_sde; per-sample norms are too noisy in low dimensions), then
    ``x ← x + ε∇ + √(2ε)·z``; α = 1 - β_t of the training schedule.
    """
    if alpha_bar >= 1:
        return x
    for _ in range(steps):
        grad = -denoise(x, t, alpha_bar).eps / math.sqrt(1 - alpha_bar)
        z = randn_like(x, generator)
        g_norm = grad.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
        z_norm = z.flatten(1).norm(dim=1).mean()
        step = 2 * alpha * (snr * z_norm / g_norm) ** 2
        x = x + step * grad + (2 * step).sqrt() * (temperature * z)
    return x
