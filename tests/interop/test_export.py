"""`mmdiff export`: diffusers + open_clip reproduce `mmdiff sample` from the exported folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors import safe_open

from mmdiff.inference.api import load
from mmdiff.cli import main
from mmdiff.inference.export import scheduler_config

from interopkit import PROMPTS, tiny_config
from diffusers_reference import ExportedModel

STEPS = 20


@pytest.fixture(scope="module")
def exported(tiny_ckpt: Path) -> Path:
    out = tiny_ckpt.parent / "export"
    assert main(["export", str(tiny_ckpt), "--out", str(out)]) == 0
    return out


def test_diffusers_reproduces_mmdiff_sample(tiny_ckpt: Path, exported: Path) -> None:
    system = load(tiny_ckpt, expect="text_to_image", device="cpu")
    ours = system.sample(PROMPTS, seed=5, sampler="ddim", steps=STEPS)
    theirs = ExportedModel(exported).sample(PROMPTS, seed=5, steps=STEPS, guidance_scale=3.0)
    diff = float((ours - theirs).abs().max())
    assert diff <= 1e-4, diff
    assert float(ours.std()) > 0.01  # not a degenerate (constant) image


def test_export_uses_ema_by_default_and_says_so(tiny_ckpt: Path, exported: Path, tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    assert main(["export", str(tiny_ckpt), "--out", str(raw_dir), "--no-ema"]) == 0
    info, raw = json.loads((exported / "mmdiff.json").read_text()), json.loads((raw_dir / "mmdiff.json").read_text())
    assert info["ema"] and not raw["ema"]
    assert "EMA (decay" in (exported / "README.md").read_text()
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    with safe_open(str(exported / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        ema_w = f.get_tensor("conv_in.weight")
    with safe_open(str(raw_dir / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        raw_w = f.get_tensor("conv_in.weight")
    assert torch.equal(raw_w, ckpt["state_dict"]["unet.conv_in.weight"])
    assert torch.allclose(ema_w, raw_w + 0.01)


def test_exported_vae_and_card(exported: Path) -> None:
    vae_config = json.loads((exported / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(0.7)
    card = (exported / "README.md").read_text()
    for needle in ("trained for **7** optimizer steps", "class_labels", "train shards", "## Metrics"):
        assert needle in card
    assert not list(exported.rglob("*.bin"))  # safetensors everywhere


def test_export_refuses_non_empty_folder(tiny_ckpt: Path, exported: Path, capsys) -> None:
    assert main(["export", str(tiny_ckpt), "--out", str(exported)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_single_file_export_loads_back_into_configs(tiny_ckpt: Path, tmp_path: Path) -> None:
    from mmdiff.models.clip import ClipEncoder
    from mmdiff.models.unet import build_unet
    from mmdiff.models.vae import build_vae

    out = tmp_path / "model.safetensors"
    assert main(["export", str(tiny_ckpt), "--out", str(out), "--format", "safetensors"]) == 0
    system = load(tiny_ckpt, device="cpu")
    cfg = tiny_config()
    cfg.model.unet.pretrained = cfg.model.vae.pretrained = cfg.model.clip.pretrained = str(out)
    unet = build_unet(cfg.model.unet, 4, 4, 64, pooled_dim=64)
    vae = build_vae(cfg.model.vae)
    clip = ClipEncoder.from_config(cfg.model.clip)
    for ours, theirs in ((unet, system.unet), (vae, system.vae), (clip.model, system.clip.model)):
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), k
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["vae_config"])["scaling_factor"] == pytest.approx(0.7)


@pytest.mark.parametrize("overrides", [
    {},
    {"diffusion.beta_schedule": "cosine", "diffusion.prediction_type": "v_prediction"},
    {"diffusion.beta_schedule": "sigmoid"},
    {"diffusion.zero_terminal_snr": "true", "diffusion.prediction_type": "v_prediction"},
    {"diffusion.resolution_shift": "2.0"},
])
def test_scheduler_config_reproduces_training_schedule(overrides) -> None:
    from mmdiff.config import load_config
    from mmdiff.diffusion import GaussianDiffusion
    from interopkit import REPO

    cfg = load_config(REPO / "configs/demo/text_to_image.yaml", [f"{k}={v}" for k, v in overrides.items()])
    ab = GaussianDiffusion.from_config(cfg.diffusion).schedule.alphas_cumprod
    config = scheduler_config(cfg, ab)
    for cls in (DDIMScheduler, DDPMScheduler):
        rebuilt = cls.from_config(config).alphas_cumprod.double()
        assert float((rebuilt - ab.double()).abs().max()) < 1e-6
    assert config["clip_sample"] is False and config["set_alpha_to_one"] is True


def test_exported_text_encoder_loads_as_local_dir_clip(tiny_ckpt: Path, exported: Path) -> None:
    from mmdiff.models.clip import ClipEncoder

    cfg = tiny_config().model.clip
    cfg.name, cfg.pretrained = f"local-dir:{exported / 'text_encoder'}", None
    clip = ClipEncoder.from_config(cfg)
    system = load(tiny_ckpt, device="cpu")
    ours, theirs = clip.encode_text(clip.tokenize(PROMPTS)), system.encode_prompts(PROMPTS)
    assert torch.equal(ours[0], theirs["context"]) and torch.equal(ours[1], theirs["pooled"])
