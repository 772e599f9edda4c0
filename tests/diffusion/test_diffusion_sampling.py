"""Sampling behaviour: guidance plumbing, img2img, inpainting, temperature, seeds, EDM, bad input."""
from __future__ import annotations

import logging

import pytest
import torch

from mmdiff.config import ConfigError, apply_overrides, check_values, schema
from mmdiff.diffusion import SAMPLERS, Denoiser, GaussianDiffusion, NoiseSchedule, SamplingOptions
from mmdiff.diffusion.guidance import concat_cond
from mmdiff.diffusion.objectives import edm_scalings
from mmdiff.diffusion.toy import GaussianMixture2D, sliced_wasserstein

logging.getLogger("mmdiff.diffusion").setLevel(logging.ERROR)
SCHED = NoiseSchedule.make("linear", 1000, 1e-4, 0.02)
SHAPE = (2, 3, 8, 8)


def model(x, t, cond=None):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
    out = 0.5 * x * torch.cos(t / 2000)
    return out if cond is None else out + cond["c"].reshape(-1, 1, 1, 1)


class Counter:
    def __init__(self, fn=model):
        self.fn, self.batches = fn, []

    def __call__(self, x, t, cond=None):
        self.batches.append(x.shape[0])
        return self.fn(x, t, cond)


# ---------------------------------------------------------------------------------------- guidance
def test_guidance_batches_cond_and_uncond_once():
    cond, uncond = {"c": torch.tensor([1.0, 2.0]), "tokens": ["a", "b"]}, {"c": torch.zeros(2), "tokens": ["", ""]}
    seen = {}

    def fn(x, t, c):
        seen.update(c=c, t=t)
        return model(x, t, c)

    den = Denoiser(fn, "epsilon", cond=cond, uncond=uncond, guidance_scale=3.0)
    x = torch.randn(SHAPE)
    out = den(x, torch.tensor(500), 0.5)
    assert seen["c"]["c"].tolist() == [0.0, 0.0, 1.0, 2.0] and seen["c"]["tokens"] == ["", "", "a", "b"]
    assert seen["t"].shape == (4,) and seen["t"].dtype == torch.long
    u, c = model(x, 500, uncond), model(x, 500, cond)
    torch.testing.assert_close(out.eps, u + 3.0 * (c - u))
    assert den.nfe == 1


def test_guidance_scale_one_and_zero_use_a_single_branch():
    cond, uncond = {"c": torch.ones(2)}, {"c": torch.zeros(2)}
    diff = GaussianDiffusion(SCHED)
    for scale, expected in [(1.0, cond), (0.0, uncond)]:
        calls = []
        diff.sample(lambda x, t, c: calls.append(c) or model(x, t, c), SHAPE, cond=cond, uncond=uncond,
                    guidance_scale=scale, steps=3)
        assert all(c is expected for c in calls) and len(calls) == 3


def test_learned_variance_guides_mean_only():
    def fn(x, t, c):
        base = model(x, t, c)
        return torch.cat([base, torch.tanh(base) + c["c"].reshape(-1, 1, 1, 1)], 1)

    den = Denoiser(fn, "epsilon", learned_variance=True, cond={"c": torch.ones(2)}, uncond={"c": torch.zeros(2)},
                   guidance_scale=4.0)
    x = torch.randn(SHAPE)
    out = den(x, 10, 0.9)
    torch.testing.assert_close(out.var, fn(x, 10, {"c": torch.ones(2)})[:, 3:])


def test_concat_cond_errors():
    with pytest.raises(ValueError, match="same keys"):
        concat_cond({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="both be tensors"):
        concat_cond({"a": torch.zeros(1)}, {"a": [1]})


# ------------------------------------------------------------------------------- img2img, inpainting
def test_img2img_runs_strength_fraction_of_steps():
    diff = GaussianDiffusion(SCHED)
    init = torch.randn(SHAPE)
    for strength, nfe in [(1.0, 20), (0.5, 10), (0.26, 5), (0.01, 1)]:
        counter = Counter()
        diff.sample(counter, SHAPE, steps=20, x_init=init, strength=strength, generator=torch.Generator().manual_seed(0))
        assert len(counter.batches) == nfe
    # strength 1 ignores x_init's content: it starts from pure noise.
    a = diff.sample(model, SHAPE, steps=5, x_init=init, generator=torch.Generator().manual_seed(0))
    b = diff.sample(model, SHAPE, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_inpainting_keeps_known_region(sampler):
    diff = GaussianDiffusion(SCHED, prediction_type="v_prediction")
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # left half known, broadcast over batch and channels
    out = diff.sample(model, SHAPE, sampler=sampler, steps=6, x_init=init, mask=mask, corrector_steps=1,
                      generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out[..., :4], init[..., :4])
    assert not torch.allclose(out[..., 4:], init[..., 4:])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler_karras", "heun"])
def test_repaint_resampling(sampler):
    diff = GaussianDiffusion(SCHED)
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    counter = Counter()
    out = diff.sample(counter, SHAPE, sampler=sampler, steps=5, x_init=init, mask=mask, resample_steps=2,
                      generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out[..., :4], init[..., :4])
    # 4 inner steps run 3 times each (Heun: 2 evaluations per step), the last step to x0 once.
    expected = 4 * 3 * (2 if sampler == "heun" else 1) + 1
    assert len(counter.batches) == expected
    with pytest.raises(ValueError, match="resample_steps needs a single-step sampler"):
        diff.sample(model, SHAPE, sampler="dpmpp_2m", x_init=init, mask=mask, resample_steps=1)
    with pytest.raises(ValueError, match="only used for inpainting"):
        diff.sample(model, SHAPE, resample_steps=1)


def test_inpainting_on_mixture_conditions_the_unknown_coordinate():
    """2-D mixture, x known: generated y should sit on a mode that shares that x."""
    mog = GaussianMixture2D(4, radius=1.0, std=0.05)  # modes (1,0), (0,1), (-1,0), (0,-1)
    diff = GaussianDiffusion(SCHED)
    init = torch.tensor([[1.0, 0.0]] * 200, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = diff.sample(mog.model(SCHED), (200, 2), sampler="ddpm", steps=100, x_init=init, mask=mask,
                      generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(out[:, 0], init[:, 0])
    assert float(out[:, 1].abs().median()) < 0.2  # y ≈ 0: the only mode with x ≈ 1


# ---------------------------------------------------------------------------- seeds, temperature, EDM
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_seeded_determinism(sampler):
    diff = GaussianDiffusion(SCHED)
    kw = dict(sampler=sampler, steps=5, eta=0.5, corrector_steps=1)
    a = diff.sample(model, SHAPE, generator=torch.Generator().manual_seed(3), **kw)
    b = diff.sample(model, SHAPE, generator=torch.Generator().manual_seed(3), **kw)
    c = diff.sample(model, SHAPE, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_scales_injected_noise_only():
    diff = GaussianDiffusion(SCHED)
    kw = dict(sampler="ddpm", steps=10)
    cold_a = diff.sample(model, SHAPE, temperature=0.0, generator=torch.Generator().manual_seed(5), **kw)
    hot = diff.sample(model, SHAPE, temperature=1.0, generator=torch.Generator().manual_seed(5), **kw)
    assert not torch.allclose(cold_a, hot)
    # Deterministic samplers ignore it.
    a = diff.sample(model, SHAPE, sampler="ddim", steps=10, temperature=0.3, generator=torch.Generator().manual_seed(5))
    b = diff.sample(model, SHAPE, sampler="ddim", steps=10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_clip_denoised_bounds_the_result():
    diff = GaussianDiffusion(SCHED, prediction_type="sample")
    out = diff.sample(lambda x, t, c: 5 * torch.ones_like(x), SHAPE, steps=5, clip_denoised=1.0)
    assert float(out.abs().max()) <= 1.0 + 1e-6


def test_edm_preconditioned_exact_model_samples_mixture():
    mog = GaussianMixture2D(8, radius=1.0, std=0.05)
    diff = GaussianDiffusion(SCHED, prediction_type="sample", sigma_data=0.5)
    exact = mog.model(SCHED, "sample")

    def edm_net(x_in, t, cond=None):  # the network F, given c_in·x_t
        ab = SCHED.alpha_bar_at(torch.as_tensor(t).double()).reshape(-1, 1)
        c_in, c_skip, c_out = edm_scalings(ab, 0.5)
        x_t = x_in / c_in
        return (exact(x_t, t) - c_skip * x_t) / c_out

    ref = mog.sample(2000, torch.Generator().manual_seed(0))
    out = diff.sample(edm_net, (2000, 2), sampler="heun", steps=18, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    assert sliced_wasserstein(out, ref) < 0.05


def test_sampling_options_from_config():
    cfg = apply_overrides(schema(), ["sampling.sampler=heun", "sampling.steps=12", "sampling.corrector_steps=1"])
    opts = SamplingOptions.from_mapping(cfg.sampling)
    assert opts.sampler == "heun" and opts.steps == 12 and opts.timestep_spacing == "leading"
    out = GaussianDiffusion.from_config(cfg.diffusion).sample(model, SHAPE, options=opts)
    assert out.shape == SHAPE and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sampler="plms"), "unknown sampler 'plms'; choose one of: ddpm, ddim, euler"),
        (dict(steps=0), "steps must be between 1 and the 1000 training timesteps, got 0."),
        (dict(steps=1001), "steps must be between 1 and the 1000 training timesteps, got 1001."),
        (dict(steps=2.5), "steps must be between 1"),
        (dict(strength=0.0, x_init=torch.zeros(SHAPE)), r"strength must be in \(0, 1\], got 0.0."),
        (dict(strength=1.5), r"strength must be in \(0, 1\], got 1.5."),
        (dict(mask=torch.ones(2, 3, 4, 4), x_init=torch.zeros(SHAPE)), "mask of shape \\(2, 3, 4, 4\\) does not match"),
        (dict(mask=torch.ones(SHAPE)), "inpainting with a mask needs x_init"),
        (dict(x_init=torch.zeros(1, 3, 8, 8)), "x_init has shape"),
        (dict(timestep_spacing="even"), "unknown timestep_spacing 'even'"),
        (dict(guidance_rescale=2.0), "guidance_rescale must be in \\[0, 1\\]"),
        (dict(no_such_option=1), "unknown sampling option 'no_such_option'"),
    ],
)
def test_bad_sample_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        GaussianDiffusion(SCHED).sample(model, SHAPE, **kwargs)
    text = str(err.value)
    assert "\n" not in text and text.endswith(".")


def test_bad_model_output_and_names():
    with pytest.raises(ValueError, match="the model returned 6 channels but 3 are expected"):
        GaussianDiffusion(SCHED).sample(lambda x, t, c: torch.cat([x, x], 1), SHAPE, steps=2)
    for kwargs in (dict(prediction_type="noise"), dict(variance_type="learned"), dict(loss_weighting="p2")):
        with pytest.raises(ValueError, match="unknown"):
            GaussianDiffusion(SCHED, **kwargs)


def test_config_sampler_names_match_library():
    from mmdiff.config import SAMPLER_NAMES

    assert tuple(SAMPLERS) == SAMPLER_NAMES


@pytest.mark.parametrize(
    "override,key",
    [
        ("sampling.sampler=plms", "sampling.sampler"),
        ("sampling.steps=5000", "sampling.steps"),
        ("sampling.strength=0", "sampling.strength"),
        ("diffusion.resolution_shift=0", "diffusion.resolution_shift"),
        ("diffusion.edm_preconditioning=true", "diffusion.edm_preconditioning"),
    ],
)
def test_config_checks(override, key):
    from mmdiff.systems.registry import system_names

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # choices fail already when merged
        check_values(apply_overrides(schema(), [f"system={sorted(system_names())[0]}", override]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_and_device():
    diff = GaussianDiffusion(SCHED, variance_type="learned_range")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, device="cuda")
    out = diff.training_loss(lambda x, t: torch.cat([x, x], 1) * 0.1, x0, gen)
    assert out["loss"].device.type == "cuda" and torch.isfinite(out["loss"])
    for sampler in SAMPLERS:
        x = diff.sample(lambda x, t, c: torch.cat([0.5 * x, torch.zeros_like(x)], 1), (2, 3, 8, 8),
                        sampler=sampler, steps=4, generator=torch.Generator(device="cuda").manual_seed(1),
                        device="cuda", corrector_steps=1)
        assert x.device.type == "cuda" and torch.isfinite(x).all()
