"""Training objectives: what the network predicts, the regression target, and loss weights.

With ``x_t = a x_0 + s ε`` (``a = √ᾱ_t``, ``s = √(1-ᾱ_t)``):

* ``epsilon``: the network predicts ε;
* ``sample``: it predicts x_0;
* ``v_prediction``: it predicts ``v = a ε - s x_0`` (Salimans & Ho 2022);
* EDM preconditioning (Karras et al. 2022), an option on top of ``sample``: the network F sees
  ``c_in x`` and ``x_0 = c_skip x + c_out F``; written in VP terms with ``D = s² + a² σ_d²``:
  ``x_in = x_t/√D``, ``x_0 = σ_d² a/D · x_t + σ_d s/√D · F``. With σ_d = 1 this is v-prediction
  with ``F = -v``.

Coefficients ``a``/``s`` may be Python floats or tensors broadcastable against x.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LOSS_WEIGHTINGS = ("uniform", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "low_discrepancy")

Coef = Union[float, Tensor]
# ᾱ below which an ε-prediction is turned into x0 as if ᾱ were this (ᾱ = 0 has no x0 from ε).
MIN_ALPHA_BAR = 2.0**-24


def _sqrt(v: Coef) -> Coef:
    return v.sqrt() if isinstance(v, Tensor) else math.sqrt(v)


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Coef) -> Tensor:
    """x_0 = (x_t - s ε)/a; a zero ᾱ is read as 2⁻²⁴ (as diffusers' Euler/DPM schedulers)."""
    ab = alpha_bar.clamp(min=MIN_ALPHA_BAR) if isinstance(alpha_bar, Tensor) else max(alpha_bar, MIN_ALPHA_BAR)
    return (x_t - _sqrt(1 - alpha_bar) * eps) / _sqrt(ab)


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Coef) -> Tensor:
    """ε = (x_t - a x_0)/s."""
    return (x_t - _sqrt(alpha_bar) * x0) / _sqrt(1 - alpha_bar)


def v_from(x0: Tensor, eps: Tensor, alpha_bar: Coef) -> Tensor:
    """v = a ε - s x_0."""
    return _sqrt(alpha_bar) * eps - _sqrt(1 - alpha_bar) * x0


def edm_scalings(alpha_bar: Coef, sigma_data: float) -> Tuple[Coef, Coef, Coef]:
    """EDM preconditioning in VP terms: (input scale, x_t coefficient, output coefficient) of x_0."""
    a, s2 = _sqrt(alpha_bar), 1 - alpha_bar
    d = s2 + alpha_bar * sigma_data**2
    return 1 / _sqrt(d), sigma_data**2 * a / d, sigma_data * _sqrt(s2) / _sqrt(d)


def split_prediction(
    out: Tensor, x_t: Tensor, prediction_type: str, alpha_bar: Coef, sigma_data: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
    """(x̂_0, ε̂) from a network's (mean) output at noise level ᾱ for input sample ``x_t``.

    ``sigma_data`` switches to the EDM output parameterisation (see module docstring).
    """
    if sigma_data is not None:
        _, c_skip, c_out = edm_scalings(alpha_bar, sigma_data)
        x0 = c_skip * x_t + c_out * out
        return x0, eps_from_x0(x_t, x0, alpha_bar)
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, out, alpha_bar), out
    if prediction_type == "sample":
        return out, eps_from_x0(x_t, out, alpha_bar)
    if prediction_type == "v_prediction":
        a, s = _sqrt(alpha_bar), _sqrt(1 - alpha_bar)
        return a * x_t - s * out, a * out + s * x_t
    raise ValueError(f"unknown prediction_type '{prediction_type}'; choose one of: {', '.join(PREDICTION_TYPES)}.")


def prediction_target(
    prediction_type: str,
    x0: Tensor,
    noise: Tensor,
    alpha_bar: Coef,
    x_t: Optional[Tensor] = None,
    sigma_data: Optional[float] = None,
) -> Tensor:
    """The regression target of the network for clean ``x0`` noised with ``noise`` at ᾱ."""
    if sigma_data is not None:
        if x_t is None:
            x_t = _sqrt(alpha_bar) * x0 + _sqrt(1 - alpha_bar) * noise
        _, c_skip, c_out = edm_scalings(alpha_bar, sigma_data)
        return (x0 - c_skip * x_t) / c_out
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return v_from(x0, noise, alpha_bar)
    raise ValueError(f"unknown prediction_type '{prediction_type}'; choose one of: {', '.join(PREDICTION_TYPES)}.")


def loss_weight(
    weighting: str,
    snr: Tensor,
    prediction_type: str,
    gamma: float = 5.0,
    sigma_data: Optional[float] = None,
) -> Tensor:
    """Per-sample weight of the MSE on the network's output.

    ``min_snr`` (Hang et al. 2023) weights the x_0-error by ``min(SNR, γ)``; on the output this is
    ``min(SNR,γ)/SNR`` for ε, ``min(SNR,γ)/(SNR+1)`` for v, ``min(SNR,γ)`` for x_0, and
    ``min(SNR,γ)·c_out²`` under EDM preconditioning. At SNR = 0 the ε weight is its limit, 1.
    """
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting '{weighting}'; choose one of: {', '.join(LOSS_WEIGHTINGS)}.")
    clipped = snr.clamp(max=gamma)
    if sigma_data is not None:
        alpha_bar = snr / (1 + snr)
        _, _, c_out = edm_scalings(alpha_bar, sigma_data)
        return clipped * c_out**2
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr)).clamp(max=1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type '{prediction_type}'; choose one of: {', '.join(PREDICTION_TYPES)}.")


def sample_timesteps(
    batch: int,
    num_timesteps: int,
    method: str = "uniform",
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Training timesteps (B,) in [0, T): i.i.d. uniform, or ``low_discrepancy``.

    Low-discrepancy (Kingma et al. 2021): one uniform offset u₀ per batch and
    ``t_i = ⌊((u₀ + i/B) mod 1) · T⌋`` — one timestep per stratum, lower-variance loss estimates.
    """
    if method == "uniform":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=gen_device)
    elif method == "low_discrepancy":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        # float64 only on the CPU (unchanged draws there): MPS has no float64, GPUs are slow at it.
        dtype = torch.float64 if gen_device.type == "cpu" else torch.float32
        u0 = torch.rand((), generator=generator, dtype=dtype, device=gen_device).cpu().double()
        u = (u0 + torch.arange(batch, dtype=torch.float64) / batch) % 1.0
        t = (u * num_timesteps).floor().long().clamp(max=num_timesteps - 1)
    else:
        raise ValueError(f"unknown timestep sampling '{method}'; choose one of: {', '.join(TIMESTEP_SAMPLINGS)}.")
    return t.to(device) if device is not None else t


def offset_noise(noise: Tensor, offset: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Noise offset (Guttenberg 2023): add ``offset ·`` a per-(sample, channel) constant to ε."""
    if offset == 0:
        return noise
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)
    extra = torch.randn(shape, generator=generator, dtype=noise.dtype, device=_gen_device(generator, noise))
    return noise + offset * extra.to(noise.device)


def randn_like(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device, then moved to x's."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=_gen_device(generator, x)).to(x.device)


def _gen_device(generator: Optional[torch.Generator], x: Tensor) -> torch.device:
    return generator.device if generator is not None else x.device
