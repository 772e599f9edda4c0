"""Timestep spacing and sampler grids, against diffusers' set_timesteps."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from mmdiff.diffusion import NoiseSchedule, make_grid

logging.getLogger("diffusers").setLevel(logging.ERROR)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CASES = [(sp, n, off) for sp in ("linspace", "leading", "trailing") for n in (1, 7, 30, 1000) for off in (0, 1)
         if not (sp == "leading" and off == 1 and n == 1000)]


def _ours(zero_snr: bool = False) -> NoiseSchedule:
    ref = DDPMScheduler(**SD, rescale_betas_zero_snr=zero_snr)
    return NoiseSchedule.from_alphas_cumprod(ref.alphas_cumprod)


@pytest.mark.parametrize("spacing,steps,offset", CASES)
def test_discrete_timesteps_match_ddpm_and_ddim(spacing, steps, offset):
    grid = make_grid(_ours(), "discrete", steps, spacing, offset)
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(**SD, timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(steps)
        assert grid.timesteps.tolist() == ref.timesteps.tolist()
    torch.testing.assert_close(grid.alphas_bar[:-1], _ours().alphas_cumprod[grid.timesteps])
    assert float(grid.alphas_bar[-1]) == 1.0 and float(grid.sigmas[-1]) == 0.0


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing,steps,offset", [c for c in CASES if c[1] in (7, 30)])
def test_euler_and_heun_grids_match(spacing, steps, offset, karras):
    kind = "euler_karras" if karras else "euler"
    grid = make_grid(_ours(), kind, steps, spacing, offset)
    ref = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras)
    ref.set_timesteps(steps)
    # diffusers rounds its σ and t tables to float32.
    np.testing.assert_allclose(grid.sigmas.numpy(), ref.sigmas.double().numpy(), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grid.timesteps.numpy(), ref.timesteps.double().numpy(), rtol=1e-5, atol=5e-4)
    if karras:
        heun = HeunDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=True)
        heun.set_timesteps(steps)
        # Heun interleaves each inner level twice: [s0, s1, s1, s2, s2, ..., 0].
        np.testing.assert_allclose(grid.sigmas[1:-1].numpy(), heun.sigmas[1:-1:2].double().numpy(), rtol=2e-6)
        np.testing.assert_allclose(grid.timesteps[1:].numpy(), heun.timesteps[1::2].double().numpy(), atol=5e-4)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing,steps,offset", [c for c in CASES if c[1] in (7, 30) and (c[2] == 0 or c[0] == "leading")])
def test_dpm_grids_match(spacing, steps, offset, karras, zero_snr):
    grid = make_grid(_ours(zero_snr), "dpm_karras" if karras else "dpm", steps, spacing, offset)
    ref = DPMSolverMultistepScheduler(
        **SD, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras, rescale_betas_zero_snr=zero_snr
    )
    ref.set_timesteps(steps)
    assert grid.timesteps.tolist() == ref.timesteps.tolist()
    np.testing.assert_allclose(grid.sigmas.numpy(), ref.sigmas.double().numpy(), rtol=2e-6, atol=1e-7)


def test_karras_grid_spans_full_range_for_dpm_but_spaced_range_for_euler():
    s = _ours()
    dpm = make_grid(s, "dpm_karras", 10, "leading")
    euler = make_grid(s, "euler_karras", 10, "leading")
    assert float(dpm.sigmas[0]) == pytest.approx(float(s.sigma(999)))
    assert float(euler.sigmas[0]) == pytest.approx(float(s.sigma(900)))  # leading: first t = 900


def test_grid_tail_and_validation():
    grid = make_grid(_ours(), "discrete", 10, "leading")
    tail = grid.tail(4)
    assert len(tail) == 6 and tail.timesteps.tolist() == grid.timesteps[4:].tolist()
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="steps must be between 1 and the 1000"):
            make_grid(_ours(), "discrete", bad)
    with pytest.raises(ValueError, match="beyond the last training timestep"):
        make_grid(_ours(), "discrete", 1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        make_grid(_ours(), "discrete", 10, "uniform")
