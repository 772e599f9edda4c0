"""A VAE whose half-precision encoder overflows gets the float32 fallback: finite latents."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

import mmdiff.models.vae as vae_module
from mmdiff.config import load_config
from mmdiff.models.vae import encode_finite
from mmdiff.systems.text_to_image import TextToImageSystem

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]


def _overflowing(vae: AutoencoderKL) -> AutoencoderKL:
    """Scale the first convolution so fp16 activations overflow (fp32 ones stay finite)."""
    w = vae.encoder.conv_in.weight
    with torch.no_grad():
        w.copy_((w.float() * 1e5).clamp(-6e4, 6e4).to(w.dtype))
    return vae


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    monkeypatch.setattr(vae_module, "_FALLBACK_WARNED", set())


def test_fp16_nan_latents_fall_back_to_fp32(caplog) -> None:
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    reference = encode_finite(_overflowing(_tiny_vae()), images).parameters
    vae = _overflowing(_tiny_vae()).half()
    assert not torch.isfinite(vae.encode(images.half()).latent_dist.parameters).all()  # the fault
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="mmdiff.models.vae"):
        first = encode_finite(vae, images).parameters
        second = encode_finite(vae, images).parameters
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert torch.allclose(first, reference, atol=0.05)
    assert [r.getMessage() for r in caplog.records] == [
        "the VAE gave non-finite latents in float16; encoding such batches again in float32 "
        "(set model.vae.precision=fp32 to always encode in float32)"]  # once, though it fell back twice
    assert vae.dtype == torch.float16  # back in half precision, weights bit-identical
    assert all(torch.equal(v, weights[k]) for k, v in vae.state_dict().items())


def test_finite_half_precision_stays_half(caplog) -> None:
    vae = _tiny_vae().half()
    with caplog.at_level(logging.WARNING, logger="mmdiff.models.vae"):
        posterior = encode_finite(vae, torch.rand(2, 3, 16, 16) * 2 - 1)
    assert posterior.parameters.dtype == torch.float16 and not caplog.records


def test_text_to_image_latents_are_finite_with_an_overflowing_fp16_vae() -> None:
    cfg = load_config(REPO / "configs" / "demo" / "longrun.yaml", ["model.vae.precision=fp16"])
    system = TextToImageSystem(cfg)
    _overflowing(system.vae)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": ["a"] * 4}
    latents = system.batch_latents(batch)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert system.vae.dtype == torch.float16
