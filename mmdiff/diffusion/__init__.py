"""mmdiff.diffusion — the math of diffusion models, model-agnostic and pure torch.

* :mod:`.schedules` — β schedules, ᾱ/SNR/σ, zero terminal SNR, resolution shift, q(x_t | x_0).
* :mod:`.objectives` — ε / x0 / v parameterisations, EDM preconditioning, min-SNR weights,
  timestep sampling, noise offset.
* :mod:`.vlb` — Gaussian KLs, discretised decoder, learned-range variance.
* :mod:`.spacing` — timestep spacing and sampler grids (Karras σs).
* :mod:`.guidance` — classifier-free guidance and the :class:`Denoiser` samplers call.
* :mod:`.samplers` — DDPM, DDIM, Euler, Heun, DPM-Solver++(2M), Langevin corrector.
* :mod:`.gaussian` — :class:`GaussianDiffusion`, what systems use.
* :mod:`.options` — :class:`SamplingOptions` (torch-free): the sampler's options and their checks.
* :mod:`.discrete` — masked (absorbing-state) diffusion for token sequences.
* :mod:`.toy` — a 2-D Gaussian mixture with an exact denoiser (tests, sampler benchmarks).
"""
from __future__ import annotations

import importlib
from typing import Any

from mmdiff.diffusion.options import SAMPLER_GRIDS, SAMPLER_NAMES, SamplingOptions

# Re-exports loaded on first use (PEP 562), so that the torch-free options above can be imported
# without torch (mmdiff.config does, and `mmdiff config` stays fast).
_LAZY = {
    "MaskedDiffusion": "discrete",
    "GaussianDiffusion": "gaussian",
    "Denoised": "guidance",
    "Denoiser": "guidance",
    "SAMPLERS": "samplers",
    "check_sampler": "samplers",
    "NoiseSchedule": "schedules",
    "Grid": "spacing",
    "make_grid": "spacing",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


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
    "SAMPLER_NAMES",
    "SamplingOptions",
    "check_sampler",
]
