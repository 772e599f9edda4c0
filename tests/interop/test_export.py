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

from interopkit import PROMPTS, tiny_config, tiny_system, write_checkpoint
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


def test_scheduler_config_keeps_the_sampling_keys() -> None:
    """steps_offset and set_alpha_to_one are the config's (Stable Diffusion's: 1 and false), which
    mmdiff's DDIM follows too; a hard-coded value would move the exported DDIM's last step."""
    from mmdiff.config import load_config
    from mmdiff.diffusion import GaussianDiffusion
    from interopkit import REPO

    cfg = load_config(REPO / "configs/demo/text_to_image.yaml",
                      ["sampling.set_alpha_to_one=false", "sampling.steps_offset=1"])
    config = scheduler_config(cfg, GaussianDiffusion.from_config(cfg.diffusion).schedule.alphas_cumprod)
    assert config["set_alpha_to_one"] is False and config["steps_offset"] == 1
    assert DDIMScheduler.from_config(config).final_alpha_cumprod < 1


def test_exported_text_encoder_loads_as_local_dir_clip(tiny_ckpt: Path, exported: Path) -> None:
    from mmdiff.models.clip import ClipEncoder

    cfg = tiny_config().model.clip
    cfg.name, cfg.pretrained = f"local-dir:{exported / 'open_clip'}", None
    clip = ClipEncoder.from_config(cfg)
    system = load(tiny_ckpt, device="cpu")
    ours, theirs = clip.encode_text(clip.tokenize(PROMPTS)), system.encode_prompts(PROMPTS)
    assert torch.equal(ours[0], theirs["context"]) and torch.equal(ours[1], theirs["pooled"])


def _export(system, folder: Path) -> Path:
    from mmdiff.inference.export import export_folder

    return export_folder(system, folder)


def test_learned_variance_exports_a_ddpm_scheduler_that_reads_it(tmp_path: Path) -> None:
    system = tiny_system(overrides=["diffusion.variance_type=learned_range"])
    folder = _export(system, tmp_path / "export")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler" and sched["variance_type"] == "learned_range"
    assert system.unet.config.out_channels == 2 * system.latent_channels
    assert "learned variance" in (folder / "README.md").read_text()
    for sampler, cls in (("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)):
        ours = system.sample(PROMPTS, seed=5, sampler=sampler, steps=STEPS)
        theirs = ExportedModel(folder, cls).sample(PROMPTS, seed=5, steps=STEPS, guidance_scale=3.0)
        assert float((ours - theirs).abs().max()) <= 1e-4, sampler
    # the learned variance matters: DDPM with a fixed one lands elsewhere
    fixed = ExportedModel(folder, DDPMScheduler)
    fixed.scheduler = DDPMScheduler.from_config(fixed.scheduler.config, variance_type="fixed_small")
    ours = system.sample(PROMPTS, seed=5, sampler="ddpm", steps=STEPS)
    assert float((ours - fixed.sample(PROMPTS, seed=5, steps=STEPS, guidance_scale=3.0)).abs().max()) > 1e-3


def test_edm_model_with_unit_sigma_data_exports_as_v_prediction(tmp_path: Path) -> None:
    system = tiny_system(overrides=["diffusion.prediction_type=sample", "diffusion.edm_preconditioning=true",
                                    "diffusion.sigma_data=1.0"])
    before = {k: v.clone() for k, v in system.unet.state_dict().items()}
    folder = _export(system, tmp_path / "export")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert "EDM preconditioning" in (folder / "README.md").read_text()
    assert all(torch.equal(v, before[k]) for k, v in system.unet.state_dict().items())  # system untouched
    ours = system.sample(PROMPTS, seed=5, sampler="ddim", steps=STEPS)
    theirs = ExportedModel(folder).sample(PROMPTS, seed=5, steps=STEPS, guidance_scale=3.0)
    assert float((ours - theirs).abs().max()) <= 1e-4
    assert float(ours.std()) > 0.01


def test_edm_model_diffusers_cannot_hold_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    system = tiny_system(overrides=["diffusion.prediction_type=sample", "diffusion.edm_preconditioning=true",
                                    "diffusion.sigma_data=0.5"])
    ckpt = write_checkpoint(system, tmp_path / "edm.ckpt")
    capsys.readouterr()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "export")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sigma_data=0.5" in err[0] and "--format safetensors" in err[0], err
    assert not (tmp_path / "export").exists()
    # the single file keeps the model whole, with no diffusers scheduler that would misread it
    single = tmp_path / "edm.safetensors"
    assert main(["export", str(ckpt), "--out", str(single), "--format", "safetensors"]) == 0
    with safe_open(str(single), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert "scheduler_config" not in meta
    assert json.loads(meta["mmdiff"])["config"]["diffusion"]["sigma_data"] == 0.5
    assert {f"unet.{k}" for k in system.unet.state_dict()} <= keys


def test_unclip_decoder_exports_its_image_tokens(tmp_path: Path) -> None:
    from mmdiff.models.prior_net import scaled_embedding

    system = tiny_system(overrides=["model.image_embed_conditioning=both", "model.image_embed_tokens=3"])
    embeds = scaled_embedding(torch.randn(len(PROMPTS), system.clip.embed_dim, generator=torch.Generator().manual_seed(1)))
    folder = _export(system, tmp_path / "export")
    assert json.loads((folder / "image_tokens" / "config.json").read_text())["n_tokens"] == 3
    assert "`image_tokens/`" in (folder / "README.md").read_text()
    ours = system.sample(PROMPTS, seed=5, sampler="ddim", steps=STEPS, image_embeds=embeds)
    theirs = ExportedModel(folder).sample(PROMPTS, seed=5, steps=STEPS, guidance_scale=3.0, image_embeds=embeds)
    assert float((ours - theirs).abs().max()) <= 1e-4
    assert float((ours - system.sample(PROMPTS, seed=5, sampler="ddim", steps=STEPS)).abs().max()) > 1e-3

    single = tmp_path / "decoder.safetensors"
    from mmdiff.inference.export import export_single_file

    export_single_file(system, single)
    with safe_open(str(single), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.startswith("image_tokens.")}
    own = {f"image_tokens.{k}": v for k, v in system.image_tokens.state_dict().items()}
    assert stored.keys() == own.keys() and all(torch.equal(stored[k], own[k]) for k in own)


def test_text_states_model_exports_a_stable_diffusion_pipeline(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    system = tiny_system(overrides=["model.unet.use_pooled_text=false"])
    with torch.no_grad():  # LayerNorms away from their (1, 0) init, so a dropped one shows
        for name, p in system.clip.model.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = _export(system, tmp_path / "export")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert (folder / "open_clip" / "open_clip_model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "DiffusionPipeline.from_pretrained" in card and "pipe.scheduler = DDIMScheduler" in card

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    # the pipeline's tokenizer gives open_clip's ids (zero padding, truncation ending in EOT)
    prompts = [*PROMPTS, "", "seven " * 40]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, system.clip.tokenize(prompts))

    size, image_size = system.latent_size, int(system.cfg.data.image_size)

    def pipeline_images() -> torch.Tensor:
        latents = torch.randn((len(PROMPTS), system.latent_channels, size, size),  # x_T as mmdiff draws it
                              generator=torch.Generator().manual_seed(5))
        images = pipe(PROMPTS, height=image_size, width=image_size, num_inference_steps=STEPS,
                      guidance_scale=3.0, latents=latents, output_type="pt").images
        return images * 2 - 1  # [0, 1] -> mmdiff's [-1, 1]

    # StableDiffusionPipeline forces steps_offset 1 on the scheduler it is built with ...
    assert system.cfg.sampling.steps_offset == 0 and pipe.scheduler.config.steps_offset == 1
    ours = system.sample(PROMPTS, seed=5, sampler="ddim", steps=STEPS, steps_offset=1)
    assert float((ours - pipeline_images()).abs().max()) <= 1e-4
    assert float(ours.std()) > 0.01
    # ... and the exported scheduler, set afterwards as the model card says, keeps the trained offset
    pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    ours = system.sample(PROMPTS, seed=5, sampler="ddim", steps=STEPS)
    assert float((ours - pipeline_images()).abs().max()) <= 1e-4


@pytest.mark.parametrize("overrides, reason", [
    ([], "pooled text embedding"),
    (["model.unet.use_pooled_text=false", "model.clip.text_layer=penultimate"], "'penultimate' text layer"),
])
def test_models_a_pipeline_cannot_hold_export_without_model_index(tmp_path: Path, caplog, overrides,
                                                                  reason) -> None:
    system = tiny_system(overrides=overrides)
    with caplog.at_level("INFO", logger="mmdiff.inference.export"):
        folder = _export(system, tmp_path / "export")
    assert not (folder / "model_index.json").exists() and not (folder / "text_encoder").exists()
    assert (folder / "open_clip" / "open_clip_config.json").is_file() and (folder / "unet").is_dir()
    lines = [r.getMessage() for r in caplog.records if "model_index.json" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines
