"""Export a trained text-to-image system for use outside mmdiff (diffusers + open_clip).

:func:`export_folder` writes::

    OUT/unet/       diffusion_pytorch_model.safetensors + config.json   (UNet2DConditionModel)
    OUT/vae/        diffusion_pytorch_model.safetensors + config.json   (AutoencoderKL; its
                    ``scaling_factor`` is the latent scale the U-Net was trained with)
    OUT/scheduler/  scheduler_config.json   (DDIMScheduler, the training β schedule and the
                    config's sampling spacing; DDPMScheduler.from_pretrained reads it too)
    OUT/text_encoder/ open_clip_config.json + open_clip_model.safetensors — loadable with
                    ``open_clip.create_model("local-dir:OUT/text_encoder")``; the ``mmdiff`` entry
                    of the JSON says which text layer the U-Net was trained on
    OUT/mmdiff.json the resolved training config, step, EMA flag, how conditioning is fed
    OUT/README.md   the model card

:func:`export_single_file` writes one ``.safetensors`` with the system's own key names
(``unet.*``, ``vae.*``, ``clip.model.*``, ``latent_scale``) and the configs as metadata; each
of mmdiff's ``pretrained:`` loaders accepts it.

Pooled-text conditioning (``model.unet.use_pooled_text``) is diffusers' ``class_embed_type:
projection``: call the exported U-Net with ``class_labels=pooled_text`` (the empty prompt's
pooled embedding for the unconditional half of classifier-free guidance).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from diffusers import DDIMScheduler

from mmdiff.config import to_container
from mmdiff.errors import UsageError
from mmdiff.io.textfiles import read_user_text

log = logging.getLogger(__name__)

# mmdiff beta schedule name -> diffusers' name (others are exported as trained_betas).
_DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_SCHEDULE_TOL = 1e-6  # max |ᾱ_mmdiff - ᾱ_diffusers| for a named schedule to count as the same


def scheduler_config(cfg: Any, alphas_cumprod: torch.Tensor) -> Dict[str, Any]:
    """A ``DDIMScheduler`` config reproducing the training schedule and the sampling spacing.

    Named schedules keep their name when diffusers rebuilds the same ᾱ table (within 1e-6);
    otherwise (sigmoid, custom, resolution shift, ...) the exact β table is written as
    ``trained_betas``. ``set_alpha_to_one`` makes DDIM's last step land on the clean sample, as
    mmdiff's sampler does.
    """
    d, s = cfg.diffusion, cfg.sampling
    config: Dict[str, Any] = {
        "num_train_timesteps": int(d.num_train_timesteps),
        "beta_start": float(d.beta_start),
        "beta_end": float(d.beta_end),
        "beta_schedule": _DIFFUSERS_SCHEDULES.get(d.beta_schedule, "linear"),
        "trained_betas": None,
        "prediction_type": d.prediction_type,
        "timestep_spacing": s.timestep_spacing,
        "steps_offset": int(s.steps_offset),
        "clip_sample": False,
        "set_alpha_to_one": True,
        "rescale_betas_zero_snr": bool(d.zero_terminal_snr),
        "thresholding": False,
    }
    rebuilt = DDIMScheduler(**config).alphas_cumprod.double()
    if d.beta_schedule not in _DIFFUSERS_SCHEDULES or float(
        (rebuilt - alphas_cumprod.double()).abs().max()
    ) > _SCHEDULE_TOL:
        ab = alphas_cumprod.double()
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        config.update(trained_betas=betas.tolist(), rescale_betas_zero_snr=False)
    return config


def _clip_export_config(system: Any) -> Dict[str, Any]:
    """``open_clip_config.json`` for the system's text encoder (open_clip's local-dir format)."""
    import open_clip

    clip_cfg = system.cfg.model.clip
    name = str(clip_cfg.name)
    if name == "custom":
        from mmdiff.models.clip import _custom_model_cfg

        model_cfg = _custom_model_cfg(clip_cfg.arch)
    else:
        model_cfg = open_clip.get_model_config(name.replace("/", "-"))
        if model_cfg is None:
            raise UsageError(f"cannot export the text encoder: open_clip has no config for '{name}'.")
    visual = system.clip.model.visual
    return {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
            "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
        },
        "mmdiff": {
            "model_name": name,
            "text_layer": system.clip.text_layer,
            "context_length": system.clip.context_length,
            "tokenizer": model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
            or "open_clip SimpleTokenizer (bundled CLIP BPE vocabulary)",
            "states": "per-token states after ln_final of the chosen layer (encoder_hidden_states)",
            "pooled": "projected pooled text embedding, unnormalised (class_labels)",
        },
    }


def _plain_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Contiguous fp32 CPU copies (safetensors refuses shared or strided storage)."""
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def export_info(system: Any, ckpt: Optional[str], use_ema: bool) -> Dict[str, Any]:
    """What the model card and ``mmdiff.json`` say about the exported weights."""
    cfg = system.cfg
    ema = bool(getattr(system, "ema_loaded", False))
    return {
        "source_checkpoint": str(ckpt) if ckpt else None,
        "global_step": int(getattr(system, "global_step_loaded", 0)),
        "weights": f"EMA (decay {cfg.model.ema_decay})" if ema else (
            "raw (--no-ema)" if not use_ema else "raw (no EMA weights in the checkpoint)"),
        "ema": ema,
        "latent_scale": float(system.latent_scale),
        "latent_shape": [system.latent_channels, system.latent_size, system.latent_size],
        "pooled_text": bool(cfg.model.unet.use_pooled_text),
        "guidance_scale": float(cfg.sampling.guidance_scale),
        "sampler": str(cfg.sampling.sampler),
        "steps": int(cfg.sampling.steps),
        "config": to_container(cfg),
    }


def export_folder(
    system: Any,
    out: str | Path,
    *,
    ckpt: Optional[str] = None,
    use_ema: bool = True,
    metrics: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the diffusers-layout folder described in the module docstring; returns ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"export folder '{out}' is not empty; pass a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    system = system.to("cpu").float()
    system.unet.save_pretrained(out / "unet", safe_serialization=True)
    system.vae.register_to_config(scaling_factor=float(system.latent_scale))
    system.vae.save_pretrained(out / "vae", safe_serialization=True)
    sched = scheduler_config(system.cfg, system.diffusion.schedule.alphas_cumprod)
    DDIMScheduler(**sched).save_pretrained(out / "scheduler")
    text_dir = out / "text_encoder"
    text_dir.mkdir()
    (text_dir / "open_clip_config.json").write_text(json.dumps(_clip_export_config(system), indent=2))
    save_file(_plain_state(system.clip.model), str(text_dir / "open_clip_model.safetensors"))
    info = export_info(system, ckpt, use_ema)
    info["metrics"] = metrics or {}
    (out / "mmdiff.json").write_text(json.dumps(info, indent=2, default=str))
    from mmdiff.inference.model_card import model_card

    (out / "README.md").write_text(model_card(info, sched))
    if sched["timestep_spacing"] == "linspace":
        log.warning("sampling.timestep_spacing is linspace: diffusers' DDIM steps to t - T//N there, "
                    "so its DDIM samples differ slightly from mmdiff's (see docs/interop.md)")
    log.info("exported %s weights to %s", info["weights"], out)
    return out


def export_single_file(
    system: Any,
    out: str | Path,
    *,
    ckpt: Optional[str] = None,
    use_ema: bool = True,
) -> Path:
    """One ``.safetensors`` of the system's state dict; configs as string metadata."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--format safetensors writes a .safetensors file; '{out}' has another suffix.")
    if out.exists():
        raise UsageError(f"'{out}' exists; pass a new file name.")
    out.parent.mkdir(parents=True, exist_ok=True)
    system = system.to("cpu").float()
    state = {k: v for k, v in _plain_state(system).items()
             if k.split(".")[0] in ("unet", "vae", "clip") or k == "latent_scale"}
    info = export_info(system, ckpt, use_ema)
    metadata = {
        "format": "mmdiff-text_to_image",
        "mmdiff": json.dumps(info, default=str),
        "unet_config": json.dumps(dict(system.unet.config), default=list),
        "vae_config": json.dumps({**dict(system.vae.config), "scaling_factor": info["latent_scale"]},
                                 default=list),
        "scheduler_config": json.dumps(scheduler_config(system.cfg, system.diffusion.schedule.alphas_cumprod)),
        "text_encoder_config": json.dumps(_clip_export_config(system)),
    }
    save_file(state, str(out), metadata=metadata)
    log.info("exported %s weights to %s", info["weights"], out)
    return out


def read_metrics(paths: Sequence[str | Path]) -> Dict[str, Any]:
    """Merge JSON metric files (e.g. ``mmdiff eval ... --out``) into one dict for the card."""
    merged: Dict[str, Any] = {}
    for p in paths:
        path = Path(p)
        text = read_user_text(path, "metrics file")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"metrics file '{path}' is not JSON ({err.msg}).") from None
        merged[path.stem] = data
    return merged



__all__: List[str] = ["export_folder", "export_single_file", "scheduler_config", "read_metrics"]
