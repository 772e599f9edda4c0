"""Training objectives: targets, loss weights, timestep sampling, noise offset, learned variance, VLB."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmdiff.config import DiffusionConfig
from mmdiff.diffusion import GaussianDiffusion, NoiseSchedule
from mmdiff.diffusion.objectives import (
    edm_scalings,
    loss_weight,
    offset_noise,
    prediction_target,
    sample_timesteps,
    split_prediction,
)
from mmdiff.diffusion.toy import GaussianMixture2D
from mmdiff.diffusion.vlb import discretized_gaussian_log_likelihood

SCHED = NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012)


def _net(channels_out: int):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, channels_out, 3, padding=1))


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_conversions_round_trip(pred):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    ab = SCHED.alpha_bar(torch.tensor([0, 10, 300, 700, 999])).reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = prediction_target(pred, x0, eps, ab)
    x0_hat, eps_hat = split_prediction(target, x_t, pred, ab)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_min_snr_weights_equalise_x0_error():
    """min-SNR-γ: every parameterisation's weighted loss equals min(SNR, γ)·‖x̂0 − x0‖²."""
    gamma = 5.0
    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 20.0, 1e4], dtype=torch.float64)
    ab = snr / (1 + snr)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    err = 0.1 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    abx = ab[:, None]
    x_t = abx.sqrt() * x0 + (1 - abx).sqrt() * eps
    expected = snr.clamp(max=gamma) * (err**2).mean(1)
    for pred in ("epsilon", "v_prediction", "sample"):
        # The output that corresponds to x̂0 = x0 + err.
        out = prediction_target(pred, x0 + err, (x_t - abx.sqrt() * (x0 + err)) / (1 - abx).sqrt().clamp(min=1e-300), abx)
        mse = ((out - prediction_target(pred, x0, eps, abx)) ** 2).mean(1)
        w = loss_weight("min_snr", snr, pred, gamma)
        keep = snr > 0  # at SNR 0 x̂0 does not enter ε or v
        torch.testing.assert_close((w * mse)[keep], expected[keep], rtol=1e-8, atol=1e-12)
    # The closed forms, and the SNR = 0 limit of the ε weight.
    torch.testing.assert_close(loss_weight("min_snr", snr, "epsilon", gamma)[1:], (snr.clamp(max=gamma) / snr)[1:])
    assert float(loss_weight("min_snr", snr, "epsilon", gamma)[0]) == 1.0
    torch.testing.assert_close(loss_weight("min_snr", snr, "v_prediction", gamma), snr.clamp(max=gamma) / (snr + 1))
    torch.testing.assert_close(loss_weight("uniform", snr, "epsilon"), torch.ones_like(snr))


def test_edm_with_unit_sigma_data_is_v_prediction():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    ab = SCHED.alpha_bar(torch.tensor([5, 200, 600, 990]))[:, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    c_in, _, _ = edm_scalings(ab, 1.0)
    torch.testing.assert_close(c_in, torch.ones_like(ab))
    f = prediction_target("sample", x0, eps, ab, x_t, sigma_data=1.0)
    torch.testing.assert_close(f, -prediction_target("v_prediction", x0, eps, ab))
    x0_hat, _ = split_prediction(f, x_t, "sample", ab, sigma_data=1.0)
    torch.testing.assert_close(x0_hat, x0)
    # EDM's λ(σ) = 1/c_out²: unit weight on F is the x0-error weighted by (σ² + σd²)/(σ σd)².
    _, _, c_out = edm_scalings(ab, 0.5)
    sigma2 = (1 - ab) / ab
    torch.testing.assert_close(1 / c_out**2, (sigma2 + 0.25) / (sigma2 * 0.25))


def test_low_discrepancy_timesteps_are_stratified():
    g = torch.Generator().manual_seed(3)
    for batch in (1, 7, 64, 1000):
        t = sample_timesteps(batch, 1000, "low_discrepancy", g)
        strata = (t.double() * batch / 1000).floor().long()
        assert sorted(strata.tolist()) == list(range(batch))
    t = sample_timesteps(10_000, 1000, "uniform", g)
    assert int(t.min()) >= 0 and int(t.max()) <= 999 and t.unique().numel() > 990


def test_noise_offset_is_per_channel_constant():
    g = torch.Generator().manual_seed(4)
    noise = torch.zeros(2000, 3, 8, 8)
    out = offset_noise(noise, 0.1, g)
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))
    assert float(out[:, :, 0, 0].std()) == pytest.approx(0.1, rel=0.05)
    assert offset_noise(noise, 0.0, g) is noise


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_training_loss_seeded_and_consistent(pred):
    diff = GaussianDiffusion(SCHED, prediction_type=pred, loss_weighting="min_snr", noise_offset=0.05,
                             timestep_sampling="low_discrepancy")
    net = _net(3)
    x0 = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    a = diff.training_loss(net_fn := (lambda x, t: net(x)), x0, torch.Generator().manual_seed(6))
    b = diff.training_loss(net_fn, x0, torch.Generator().manual_seed(6))
    assert set(a) == {"loss", "mse"} and torch.isfinite(a["loss"]) and a["loss"].requires_grad
    assert torch.equal(a["loss"], b["loss"])
    # Explicit t and noise: the model sees q_sample(x0, t, noise) and the loss is the weighted MSE.
    t, noise = torch.full((8,), 500), torch.randn_like(x0)
    seen = {}

    def spy(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    out = diff.training_loss(spy, x0, t=t, noise=noise)
    torch.testing.assert_close(seen["x"], diff.q_sample(x0, t, noise))
    target = prediction_target(pred, x0, noise, SCHED.alpha_bar(500).float())
    w = loss_weight("min_snr", SCHED.snr(t).float(), pred, 5.0)
    torch.testing.assert_close(out["loss"], (w * (target**2).mean((1, 2, 3))).mean())


def test_learned_variance_hybrid_loss_stops_mean_gradient():
    x0 = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(7)).clamp(-1, 1)
    grads = {}
    for weight in (0.0, 1000.0):
        diff = GaussianDiffusion(SCHED, variance_type="learned_range", vlb_weight=weight)
        param = torch.zeros(1, 6, 8, 8, requires_grad=True)
        out = diff.training_loss(lambda x, t: param.expand(x.shape[0], -1, -1, -1) + 0.1 * torch.cat([x, x], 1),
                                 x0, torch.Generator().manual_seed(8))
        assert "vlb" in out and torch.isfinite(out["vlb"])
        out["loss"].backward()
        grads[weight] = param.grad.clone()
    # The VLB term moves only the variance channels; the mean channels see L_simple only.
    torch.testing.assert_close(grads[0.0][:, :3], grads[1000.0][:, :3])
    assert float(grads[0.0][:, 3:].abs().max()) == 0.0
    assert float(grads[1000.0][:, 3:].abs().max()) > 0.0
    with pytest.raises(ValueError, match="6 channels are expected"):
        GaussianDiffusion(SCHED, variance_type="learned_range").training_loss(lambda x, t: x, x0)


def test_discretized_likelihood_is_normalised():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.3)), (0.9, math.log(0.01)), (-2.0, math.log(1.0)), (0.5, math.log(1e-4))]:
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_vlb_bits_per_dim_exact_model_beats_trivial():
    mog = GaussianMixture2D(8, radius=0.6, std=0.04)
    schedule = NoiseSchedule.make("linear", 100, 1e-3, 0.2)
    diff = GaussianDiffusion(schedule, prediction_type="epsilon")
    x0 = mog.sample(64, torch.Generator().manual_seed(9)).float()
    x0 = ((x0 + 1) * 127.5).round() / 127.5 - 1
    exact = mog.model(schedule, "epsilon")
    good = diff.vlb_bits_per_dim(lambda x, t: exact(x, t).float(), x0, torch.Generator().manual_seed(1))
    bad = diff.vlb_bits_per_dim(lambda x, t: torch.zeros_like(x), x0, torch.Generator().manual_seed(1))
    assert good["vb"].shape == (64, 100) and torch.isfinite(good["total_bpd"]).all()
    assert float(good["total_bpd"].mean()) < float(bad["total_bpd"].mean())
    assert float(good["prior_bpd"].max()) < 1e-3
    large = diff.vlb_bits_per_dim(lambda x, t: exact(x, t).float(), x0, torch.Generator().manual_seed(1), variance_type="fixed_large")
    assert torch.isfinite(large["total_bpd"]).all()


def test_from_config_accepts_enums_and_strings():
    cfg = OmegaConf.merge(
        OmegaConf.structured(DiffusionConfig),
        {"prediction_type": "v_prediction", "zero_terminal_snr": True, "loss_weighting": "min_snr"},
    )
    diff = GaussianDiffusion.from_config(cfg)
    assert diff.prediction_type == "v_prediction" and diff.loss_weighting == "min_snr"
    assert float(diff.schedule.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    plain = GaussianDiffusion.from_config({"beta_schedule": "custom", "betas": [0.1, 0.2, 0.3],
                                           "num_train_timesteps": 3, "edm_preconditioning": True,
                                           "prediction_type": "sample", "sigma_data": 0.5})
    assert plain.num_timesteps == 3 and plain.sigma_data == 0.5
    with pytest.raises(ValueError, match="EDM preconditioning needs prediction_type 'sample'"):
        GaussianDiffusion.from_config({"edm_preconditioning": True})


def test_low_discrepancy_draws_no_float64_on_an_accelerator():
    """Low-discrepancy timesteps draw no float64 on the generator's device (meta stands in for MPS/CUDA)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from accelerator_sim import Float64OnDevice, MetaGenerator

    gen = MetaGenerator()
    gen.manual_seed(3)
    with Float64OnDevice() as guard:
        t = sample_timesteps(8, 1000, "low_discrepancy", generator=gen)
    assert guard.made == []
    assert sorted((t // 125).tolist()) == list(range(8))  # still one timestep per stratum


def test_low_discrepancy_draws_on_the_cpu_are_unchanged():
    gen = torch.Generator().manual_seed(3)
    u0 = float(torch.rand((), generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    expected = [math.floor(((u0 + i / 8) % 1.0) * 1000) for i in range(8)]
    assert sample_timesteps(8, 1000, "low_discrepancy", generator=gen).tolist() == expected
