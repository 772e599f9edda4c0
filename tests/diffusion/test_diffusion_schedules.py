"""Schedules and the forward process, against diffusers' DDPMScheduler tables."""
from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDPMScheduler

from mmdiff.diffusion import NoiseSchedule
from mmdiff.diffusion.schedules import continuous_alpha_bar, make_betas, rescale_zero_terminal_snr, shift_snr
from mmdiff.diffusion.spacing import sigma_to_t

logging.getLogger("diffusers").setLevel(logging.ERROR)

# (mmdiff name, diffusers name, beta_start, beta_end)
SCHEDULES = [
    ("linear", "linear", 1e-4, 0.02),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
    ("sigmoid", "sigmoid", 1e-4, 0.02),
]


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind,dkind,start,end", SCHEDULES)
def test_alphas_cumprod_match_diffusers(kind, dkind, start, end, zero_snr):
    ours = NoiseSchedule.make(kind, 1000, start, end, zero_terminal_snr=zero_snr)
    ref = DDPMScheduler(beta_schedule=dkind, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr)
    ref_ab = ref.alphas_cumprod.double()
    # mmdiff computes in float64, diffusers in float32: elementwise ≤ 1e-5 relative, plus 1e-6
    # absolute for the smallest ᾱ (the tail of the cosine / zero-SNR tables), where diffusers' own
    # float32 cumulative product is only accurate to ~4e-7.
    torch.testing.assert_close(ours.alphas_cumprod, ref_ab, rtol=1e-5, atol=1e-6)
    # With zero terminal SNR the last betas are ratios of tiny ᾱ: diffusers' float32 ones are
    # off by up to 2e-5 relative there, so betas are compared for the plain schedules only.
    if not zero_snr:
        torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=1e-5, atol=1e-6)


def test_zero_terminal_snr_properties():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    ab, ab_new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert abs(float(ab_new[-1])) < 1e-12
    assert float(ab_new[0]) == pytest.approx(float(ab[0]), rel=1e-12)
    sched = NoiseSchedule(rescaled)
    assert float(sched.snr(999)) == pytest.approx(0.0, abs=1e-12)
    assert torch.isinf(sched.sigma(999))


def test_resolution_shift_divides_snr():
    base = NoiseSchedule.make("linear", 1000)
    shifted = NoiseSchedule.make("linear", 1000, resolution_shift=2.0)
    t = torch.arange(0, 1000, 37)
    torch.testing.assert_close(shifted.snr(t), base.snr(t) / 4.0, rtol=1e-9, atol=0)
    torch.testing.assert_close(shift_snr(base.betas, 1.0), base.betas)


def test_cosine_capped_and_custom():
    betas = make_betas("cosine", 1000)
    assert float(betas.max()) == pytest.approx(0.999)
    custom = NoiseSchedule.make("custom", betas=[0.1, 0.2, 0.3])
    torch.testing.assert_close(custom.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        make_betas("custom", 2, betas=[0.1, 1.5])


def test_helpers_consistent():
    s = NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012)
    t = torch.tensor([0, 10, 500, 999])
    ab = s.alpha_bar(t)
    torch.testing.assert_close(s.snr(t), ab / (1 - ab))
    torch.testing.assert_close(s.log_snr(t), torch.log(ab / (1 - ab)))
    torch.testing.assert_close(s.sigma(t), ((1 - ab) / ab).sqrt())
    # alpha_bar_at: exact at integers, and the inverse of sigma_to_t (log-σ interpolation).
    torch.testing.assert_close(s.alpha_bar_at(t.double()), ab)
    frac = torch.tensor([3.25, 400.5, 998.75], dtype=torch.float64)
    sig = ((1 - s.alpha_bar_at(frac)) / s.alpha_bar_at(frac)).sqrt()
    back = sigma_to_t(sig.numpy(), s.log_sigmas().numpy())
    torch.testing.assert_close(torch.from_numpy(back), frac, rtol=0, atol=1e-9)


def test_continuous_time_matches_table():
    for kind, start, end in [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("cosine", 1e-4, 0.02)]:
        s = NoiseSchedule.make(kind, 1000, start, end)
        u = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
        cont = continuous_alpha_bar(kind, u, start, end, 1000)
        # ᾱ_t of the table is the continuous ᾱ at u = (t+1)/T up to O(β) discretisation error.
        assert float((cont[:990] - s.alphas_cumprod[:990]).abs().max()) < 5e-3, kind


def test_q_sample_matches_add_noise_and_velocity():
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = NoiseSchedule.from_alphas_cumprod(ref.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(s.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    from mmdiff.diffusion.objectives import prediction_target

    ab = s.alpha_bar(t).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(
        prediction_target("v_prediction", x0, noise, ab), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6
    )


def test_one_step_forward_composes_to_closed_form():
    s = NoiseSchedule.make("linear", 50, 1e-3, 0.2)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    # Track x_t = c·x0 + Σ_k w_k ε_k exactly by feeding unit noises coordinate-wise.
    coef_x0, noise_var = x0.clone(), torch.zeros(())
    x = x0.clone()
    for t in range(50):
        tt = torch.full((4,), t)
        x = s.q_step(x, tt, torch.zeros_like(x))
        beta = s.betas[t]
        noise_var = (1 - beta) * noise_var + beta
        torch.testing.assert_close(x, s.alpha_bar(t).sqrt() * coef_x0)
        torch.testing.assert_close(noise_var, 1 - s.alpha_bar(t))
