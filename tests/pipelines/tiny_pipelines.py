"""Tiny random-init Stable Diffusion pipelines (SD 1.x, SD 2.x, SDXL) with the real folder layouts.

Each is a diffusers pipeline built from tiny components of the real kinds and ``save_pretrained``
into a folder: ``UNet2DConditionModel`` (widths 32/64, SD 2.x and SDXL with linear projections,
SDXL with ``text_time`` added conditions), ``AutoencoderKL`` (widths 32/64: 16 px ↔ 8×8 latents),
transformers CLIP text encoders (hidden 32/48, 2 layers, CLIP's 49408-token vocabulary),
``CLIPTokenizer`` folders written offline, and a ``DDIMScheduler`` with Stable Diffusion's config.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from mmdiff.models.clip_tokenizer import EOS_TOKEN, write_clip_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
IMAGE_SIZE = 16  # VAE factor 2 × U-Net sample_size 8


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(folder, pad_token=pad_token, model_max_length=77)
        return CLIPTokenizer.from_pretrained(folder)


def _text_config(hidden: int, act: str, projection: int = 0, old_ids: bool = False):
    from transformers import CLIPTextConfig

    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1) if old_ids else {}  # SD 1.x's config.json
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
                          projection_dim=projection or hidden, **ids)


def _scheduler(family: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
                         prediction_type="v_prediction" if family == "sd2" else "epsilon",
                         timestep_spacing="leading")


def _vae(scaling: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=32, sample_size=IMAGE_SIZE, scaling_factor=scaling)


def _unet(family: str, text_width: int, **extra: Any):
    from diffusers import UNet2DConditionModel

    xl = family == "sdxl"
    kwargs: Dict[str, Any] = dict(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D") if xl else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D") if xl else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=2 if family == "sd1" else (2, 4),
        use_linear_projection=family != "sd1", norm_num_groups=32,
    )
    if xl:
        kwargs.update(transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8)
    kwargs.update(extra)
    return UNet2DConditionModel(**kwargs)


def build_pipeline(family: str, seed: int = 0):
    """The diffusers pipeline object of ``family`` (random weights from ``seed``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if family == "sdxl":
        te1 = CLIPTextModel(_text_config(32, "quick_gelu", old_ids=True))
        te2 = CLIPTextModelWithProjection(_text_config(48, "gelu", projection=24))
        unet = _unet(family, 32 + 48, projection_class_embeddings_input_dim=6 * 8 + 24)
        return StableDiffusionXLPipeline(
            vae=_vae(0.13025), text_encoder=te1, text_encoder_2=te2, tokenizer=_tokenizer(EOS_TOKEN),
            tokenizer_2=_tokenizer("!"), unet=unet, scheduler=_scheduler(family), force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    sd1 = family == "sd1"
    text = CLIPTextModel(_text_config(32, "quick_gelu" if sd1 else "gelu", old_ids=sd1))
    return StableDiffusionPipeline(
        vae=_vae(0.18215), text_encoder=text, tokenizer=_tokenizer(EOS_TOKEN if sd1 else "!"),
        unet=_unet(family, 32), scheduler=_scheduler(family), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """``build_pipeline(family)`` saved into ``folder`` (safetensors); returns ``folder``."""
    build_pipeline(family, seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def pipeline_config(tmp_path: Path, folder: Path, shards: Path | None = None, run: str = "run",
                    **sections: Dict[str, Any]) -> Path:
    """A ``text_to_image`` config fine-tuning the pipeline in ``folder`` on the digit ``shards``
    (CPU, CSV logging, a few steps); ``sections`` are merged one level deep."""
    import yaml

    cfg: Dict[str, Any] = {
        "system": "text_to_image",
        "run_dir": str(tmp_path / run),
        "model": {"pretrained": str(folder), "ema_decay": 0.9, "caption_dropout": 0.25},
        "sampling": {"prompts": ["a handwritten digit one"], "steps": 2, "every_n_steps": 100000},
        "optim": {"warmup_steps": 1},
        "trainer": {"max_steps": 3, "val_every_n_steps": 100000, "limit_val_batches": 1,
                    "checkpoint_every_n_steps": 100000, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "accelerator": "cpu", "devices": "1"},
        "logger": {"kind": "csv"},
    }
    if shards is not None:
        cfg["data"] = {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                       "batch_size": 4, "val_batch_size": 4, "num_workers": 0, "steps_per_epoch": 3,
                       "shuffle_buffer": 8}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fine_tune(tmp_path: Path, folder: Path, shards: Path, run: str = "run", **sections: Dict[str, Any]) -> Path:
    """Fit :func:`pipeline_config`'s few steps with ``mmdiff fit``; returns the run's last.ckpt."""
    from mmdiff.cli import main

    config = pipeline_config(tmp_path, folder, shards, run=run, **sections)
    if main(["fit", str(config)]) != 0:
        raise RuntimeError(f"mmdiff fit {config} failed")
    return tmp_path / run / "checkpoints" / "last.ckpt"


#: What the sampling-parity tests run on both sides: prompts (one empty), DDIM steps, guidance, seed.
PARITY_PROMPTS = ["a red cat on a mat, oil painting!", ""]
PARITY_STEPS, PARITY_GUIDANCE, PARITY_SEED = 4, 3.0, 3


def mmdiff_ddim(system, **kwargs: Any) -> tuple:
    """(final latents, images in [0, 1]) of ``system.sample`` with DDIM on the parity prompts;
    the latents are caught on their way into the VAE decoder."""
    seen = {}
    decode = system.decode_latents

    def keep(latents):
        seen["latents"] = latents
        return decode(latents)

    system.decode_latents = keep
    try:
        images = system.sample(PARITY_PROMPTS, seed=PARITY_SEED, steps=PARITY_STEPS,
                               guidance_scale=PARITY_GUIDANCE, sampler="ddim", **kwargs)
    finally:
        del system.decode_latents
    return seen["latents"], (images + 1) / 2


def diffusers_ddim(pipe, **kwargs: Any) -> tuple:
    """(final latents, images in [0, 1]) of the diffusers pipeline ``pipe`` from the x_T
    :func:`mmdiff_ddim` starts at (mmdiff draws x_T first from a generator seeded with the seed)."""
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(len(PARITY_PROMPTS), 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2,
                      generator=torch.Generator().manual_seed(PARITY_SEED))
    run = dict(num_inference_steps=PARITY_STEPS, guidance_scale=PARITY_GUIDANCE, **kwargs)
    with torch.no_grad():
        latents = pipe(PARITY_PROMPTS, latents=x_T.clone(), output_type="latent", **run).images
        images = pipe(PARITY_PROMPTS, latents=x_T.clone(), output_type="pt", **run).images
    return latents, images
