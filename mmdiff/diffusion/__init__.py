"""mmdiff.diffusion — the math of diffusion models, model-agnostic and pure torch.

* :mod:`.schedules` — β schedules, ᾱ/SNR/σ, zero terminal SNR, resolution shift, q(x_t | x_0).
* :mod:`.objectives` — ε / x0 / v parameterisations, EDM preconditioning, min-SNR weights,
  timestep sampling, noise offset.
* :mod:`.vlb` — Gaussian KLs, discretised decoder, learned-range variance.
* :mod:`.spacing` — timestep spacing and sampler grids (Karras σs).
* :mod:`.guidance` — classifier-free guidance and the :class:`Denoiser` samplers call.
* :mod:`.samplers` — DDPM, DDIM, Euler, Heun, DPM-Solver++(2M), Langevin corrector.
* :mod:`.gaussian` — :class:`GaussianDiffusion`, what systems use.
* :mod:`.discrete` — masked (absorbing-state) diffusion for token sequences.
* :mod:`.toy` — a 2-D Gaussian mixture with an exact denoiser (tests, sampler benchmarks).
"""
from mmdiff.diffusion.discrete import MaskedDiffusion
from mmdiff.diffusion.gaussian import GaussianDiffusion, sample_kwargs
from mmdiff.diffusion.guidance import Denoised, Denoiser
from mmdiff.diffusion.samplers import SAMPLER_GRIDS, SAMPLERS, check_sampler
from mmdiff.diffusion.schedules import NoiseSchedule
from mmdiff.diffusion.spacing import Grid, make_grid

__all__ = [
    "GaussianDiffusion",
    "MaskedDiffusion",
    "NoiseSchedule",
    "Denoiser",
    "Denoised",
    "Grid",
    "make_grid",
    "SAMPLERS",
    "SAMPLER_GRIDS",
    "check_sampler",
    "sample_kwargs",
]
