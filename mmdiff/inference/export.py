"""Export a trained text-to-image system for use outside mmdiff (diffusers + open_clip).

:func:`export_folder` writes::

    OUT/unet/       diffusion_pytorch_model.safetensors + config.json   (UNet2DConditionModel)
    OUT/vae/        diffusion_pytorch_model.safetensors + config.json   (AutoencoderKL; its
                    ``scaling_factor`` is the latent scale the U-Net was trained with)
    OUT/scheduler/  scheduler_config.json   (DDIMScheduler, the training β schedule and the
                    config's sampling spacing; DDPMScheduler.from_pretrained reads it too; a
                    DDPMScheduler with ``variance_type: learned_range`` for a learned variance)
    OUT/open_clip/  open_clip_config.json + open_clip_model.safetensors — the whole open_clip model,
                    loadable with ``open_clip.create_model("local-dir:OUT/open_clip")``; the
                    ``mmdiff`` entry of the JSON says which text layer the U-Net was trained on
    OUT/text_encoder/ (pipeline-ready models) transformers ``CLIPTextModel`` whose
                    ``last_hidden_state`` equals the open_clip states the U-Net was trained on
    OUT/tokenizer/  (pipeline-ready models) ``CLIPTokenizer`` files giving open_clip's ids
                    (``!`` = id 0 pads, as open_clip's zeros; ``model_max_length`` = context length)
    OUT/model_index.json (pipeline-ready models) ``StableDiffusionPipeline`` with no safety
                    checker: ``DiffusionPipeline.from_pretrained(OUT)`` samples as mmdiff does
    OUT/image_tokens/ (unCLIP decoder with image-embedding tokens) config.json + model.safetensors:
                    ``LayerNorm(Linear(embedding).view(B, N, W))``, appended to the text states
    OUT/mmdiff.json the resolved training config, step, EMA flag, how conditioning is fed
    OUT/README.md   the model card

A LoRA-trained system is written with its adapters merged into the weights
(:func:`mmdiff.inference.lora_export.merged_copy`); ``mmdiff export --lora`` writes the adapters alone.

:func:`export_single_file` writes one ``.safetensors`` with the system's own key names
(``unet.*``, ``vae.*``, ``clip.model.*``, ``image_tokens.*``, ``latent_scale``) and the configs
as metadata; each of mmdiff's ``pretrained:`` loaders accepts it. It holds every model mmdiff
trains, also those a diffusers folder cannot (EDM preconditioning with σ_data ≠ 1).

EDM preconditioning (``diffusion.edm_preconditioning``) feeds the U-Net ``c_in·x_t`` and the
integer timestep; diffusers' EDM schedulers feed ``c_in·x`` but ``0.25·log σ`` as the timestep,
so no diffusers scheduler reproduces it in general. With σ_data = 1, though, ``c_in = 1`` and
``x_0 = √ᾱ x_t + √(1-ᾱ) F``: v-prediction with ``v = -F``, so the folder gets the U-Net with its
``conv_out`` negated and ``prediction_type: v_prediction``; other σ_data are refused.

A model is pipeline-ready when the U-Net reads nothing but the text states (no pooled-text class
embedding, no image embedding), the states are the last text layer's, the text tower converts to
transformers' CLIP (:func:`mmdiff.models.hf_text.hf_from_open_clip_text`), its tokenizer is
open_clip's CLIP BPE and the scheduler is DDIM-readable (no learned variance). Other models get
everything but the last three entries, and one log line says why. The pipeline's tokenizer pads
with ``!`` (id 0, open_clip's padding); as in SD 2.x pipelines, a ``!`` inside a prompt then
also becomes id 0 where open_clip's BPE would merge it (e.g. ``!!``).

Pooled-text conditioning (``model.unet.use_pooled_text``) is diffusers' ``class_embed_type:
projection``: call the exported U-Net with ``class_labels=pooled_text`` (the empty prompt's
pooled embedding for the unconditional half of classifier-free guidance).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import diffusers
import open_clip
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn
from safetensors.torch import save_file
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mmdiff.config import to_container
from mmdiff.errors import CheckpointError, UsageError
from mmdiff.inference.lora_export import merged_copy
from mmdiff.inference.model_card import model_card
from mmdiff.io.atomic import AtomicFile, write_text_atomic
from mmdiff.io.textfiles import read_user_text
from mmdiff.models.clip import _custom_model_cfg
from mmdiff.models.clip_tokenizer import write_clip_tokenizer
from mmdiff.models.hf_text import hf_from_open_clip_text

log = logging.getLogger(__name__)

# mmdiff beta schedule name -> diffusers' name (others are exported as trained_betas).
_DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_SCHEDULE_TOL = 1e-6  # max |ᾱ_mmdiff - ᾱ_diffusers| for a named schedule to count as the same


def _edm_as_v_prediction(cfg: Any) -> bool:
    """True for an EDM-preconditioned model, which diffusers holds only as v-prediction (σ_data = 1).

    Raises :class:`CheckpointError` for any other σ_data (see the module docstring).
    """
    d = cfg.diffusion
    if not bool(d.edm_preconditioning):
        return False
    if float(d.sigma_data) != 1.0:
        raise CheckpointError(
            f"cannot export this EDM-preconditioned model (diffusion.sigma_data={float(d.sigma_data):g}) to "
            "diffusers: its U-Net takes c_in-scaled input with the integer timestep, which no diffusers "
            "scheduler feeds (only sigma_data=1 maps exactly, to v_prediction); use --format safetensors."
        )
    return True


def _learned_variance(cfg: Any) -> bool:
    return cfg.diffusion.variance_type == "learned_range"


def scheduler_config(cfg: Any, alphas_cumprod: torch.Tensor) -> Dict[str, Any]:
    """A ``DDIMScheduler`` config reproducing the training schedule and the sampling spacing.

    Named schedules keep their name when diffusers rebuilds the same ᾱ table (within 1e-6);
    otherwise (sigmoid, custom, resolution shift, ...) the exact β table is written as
    ``trained_betas``. ``set_alpha_to_one`` makes DDIM's last step land on the clean sample, as
    mmdiff's sampler does. A learned variance adds ``variance_type: learned_range`` (read by
    ``DDPMScheduler``); EDM preconditioning is ``v_prediction`` or a :class:`CheckpointError`
    (:func:`_edm_as_v_prediction`).
    """
    d, s = cfg.diffusion, cfg.sampling
    prediction = "v_prediction" if _edm_as_v_prediction(cfg) else d.prediction_type
    config: Dict[str, Any] = {
        "num_train_timesteps": int(d.num_train_timesteps),
        "beta_start": float(d.beta_start),
        "beta_end": float(d.beta_end),
        "beta_schedule": _DIFFUSERS_SCHEDULES.get(d.beta_schedule, "linear"),
        "trained_betas": None,
        "prediction_type": prediction,
        "timestep_spacing": s.timestep_spacing,
        "steps_offset": int(s.steps_offset),
        "clip_sample": False,
        "set_alpha_to_one": True,
        "rescale_betas_zero_snr": bool(d.zero_terminal_snr),
        "thresholding": False,
    }
    rebuilt = DDIMScheduler(**config).alphas_cumprod.double()
    if _learned_variance(cfg):
        config["variance_type"] = "learned_range"
    if d.beta_schedule not in _DIFFUSERS_SCHEDULES or float(
        (rebuilt - alphas_cumprod.double()).abs().max()
    ) > _SCHEDULE_TOL:
        ab = alphas_cumprod.double()
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        config.update(trained_betas=betas.tolist(), rescale_betas_zero_snr=False)
    return config


def _clip_export_config(system: Any) -> Dict[str, Any]:
    """``open_clip_config.json`` for the system's text encoder (open_clip's local-dir format)."""
    clip_cfg = system.cfg.model.clip
    name = str(clip_cfg.name)
    if name == "custom":
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
        "image_embed_conditioning": cfg.model.image_embed_conditioning,
        "edm_preconditioning": bool(cfg.diffusion.edm_preconditioning),
        "lora_merged": bool(cfg.model.get("lora") and cfg.model.lora.rank),
        "guidance_scale": float(cfg.sampling.guidance_scale),
        "sampler": str(cfg.sampling.sampler),
        "steps": int(cfg.sampling.steps),
        "config": to_container(cfg),
    }


def _image_tokens_config(tokens: torch.nn.Module) -> Dict[str, Any]:
    """``image_tokens/config.json``: enough to rebuild :class:`~mmdiff.models.prior_net.ImageEmbedTokens`."""
    return {
        "embed_dim": int(tokens.proj.in_features),
        "n_tokens": int(tokens.n_tokens),
        "width": int(tokens.width),
        "layer_norm_eps": float(tokens.norm.eps),
        "forward": "LayerNorm(Linear(image_embed).view(B, n_tokens, width)), appended after the text "
                   "states in encoder_hidden_states; image_embed is the CLIP image embedding scaled to "
                   "norm sqrt(embed_dim), zeros for the unconditional branch",
    }


def _save_unet(unet: torch.nn.Module, folder: Path, negate_output: bool) -> None:
    """``save_pretrained``; with ``negate_output`` the saved U-Net predicts ``-F`` (EDM σ_data = 1 → v)."""
    if not negate_output:
        unet.save_pretrained(folder, safe_serialization=True)
        return
    conv = unet.conv_out
    with torch.no_grad():  # a sign flip is exact, so flipping back restores the weights bit for bit
        conv.weight.neg_()
        if conv.bias is not None:
            conv.bias.neg_()
        try:
            unet.save_pretrained(folder, safe_serialization=True)
        finally:
            conv.weight.neg_()
            if conv.bias is not None:
                conv.bias.neg_()


# The folder holding the whole open_clip model (``text_encoder/`` is the transformers one).
OPEN_CLIP_DIR = "open_clip"
# open_clip pads with zeros, the id of "!" in the CLIP vocabulary (as SD 2.x's tokenizers do).
_OPEN_CLIP_PAD = "!"
_CLIP_VOCAB_SIZE = 49408


def _pipeline_blocker(system: Any, sched: Dict[str, Any]) -> Optional[str]:
    """Why the model cannot be a ``StableDiffusionPipeline`` (None when it can)."""
    cfg = system.cfg
    if bool(cfg.model.unet.use_pooled_text):
        return "the U-Net takes the pooled text embedding as class_labels (model.unet.use_pooled_text)"
    if cfg.model.image_embed_conditioning != "none":
        return "the U-Net is an unCLIP decoder conditioned on image embeddings"
    if system.clip.text_layer != "last":
        return f"the U-Net reads the '{system.clip.text_layer}' text layer, not the last one"
    if "variance_type" in sched:
        return "the U-Net predicts a learned variance, which the pipeline's guidance would mix"
    tok = system.clip.tokenizer
    if not (isinstance(tok, SimpleTokenizer) and tok.vocab_size == _CLIP_VOCAB_SIZE
            and tok.clean_fn is get_clean_fn("lower") and tok.reduction_fn is None):
        return "the text encoder's tokenizer is not open_clip's CLIP BPE tokenizer"
    return None


def _write_pipeline_text(system: Any, out: Path) -> None:
    """``text_encoder/`` (transformers CLIPTextModel) and ``tokenizer/`` (CLIPTokenizer files)."""
    # CLIPTextModel, not ...WithProjection: StableDiffusionPipeline reads output [0], which must be
    # the token states; the projection stays in open_clip/.
    text_encoder = hf_from_open_clip_text(system.clip.model, with_projection=False)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    write_clip_tokenizer(out / "tokenizer", pad_token=_OPEN_CLIP_PAD,
                         model_max_length=system.clip.context_length)


def _model_index(scheduler_class: str) -> Dict[str, Any]:
    """``model_index.json`` of a StableDiffusionPipeline without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def export_folder(
    system: Any,
    out: str | Path,
    *,
    ckpt: Optional[str] = None,
    use_ema: bool = True,
    metrics: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the diffusers-layout folder described in the module docstring; returns ``out``.

    Raises :class:`CheckpointError` (before writing anything) for a model diffusers cannot hold.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"export folder '{out}' is not empty; pass a new or empty folder.")
    edm = _edm_as_v_prediction(system.cfg)
    sched = scheduler_config(system.cfg, system.diffusion.schedule.alphas_cumprod)
    out.mkdir(parents=True, exist_ok=True)
    system = merged_copy(system).to("cpu").float()
    _save_unet(system.unet, out / "unet", negate_output=edm)
    system.vae.register_to_config(scaling_factor=float(system.latent_scale))
    system.vae.save_pretrained(out / "vae", safe_serialization=True)
    # DDPMScheduler is the diffusers class with a learned_range variance (as DeepFloyd IF ships it).
    scheduler_cls = DDPMScheduler if "variance_type" in sched else DDIMScheduler
    scheduler_cls.from_config(sched).save_pretrained(out / "scheduler")
    blocker = _pipeline_blocker(system, sched)
    if blocker is None:
        try:
            _write_pipeline_text(system, out)
        except CheckpointError as err:  # a tower transformers' CLIP cannot hold
            blocker = str(err).rstrip(".")
    text_dir = out / OPEN_CLIP_DIR
    text_dir.mkdir()
    write_text_atomic(text_dir / "open_clip_config.json", json.dumps(_clip_export_config(system), indent=2))
    with AtomicFile(text_dir / "open_clip_model.safetensors") as f:
        save_file(_plain_state(system.clip.model), f.name)
    tokens = getattr(system, "image_tokens", None)
    if tokens is not None:
        tokens_dir = out / "image_tokens"
        tokens_dir.mkdir()
        write_text_atomic(tokens_dir / "config.json", json.dumps(_image_tokens_config(tokens), indent=2))
        with AtomicFile(tokens_dir / "model.safetensors") as f:
            save_file(_plain_state(tokens), f.name)
    info = export_info(system, ckpt, use_ema)
    info["metrics"] = metrics or {}
    info["pipeline"] = blocker is None
    write_text_atomic(out / "mmdiff.json", json.dumps(info, indent=2, default=str))
    write_text_atomic(out / "README.md", model_card(info, sched))
    if blocker is None:  # last: its presence says the folder is a complete pipeline
        write_text_atomic(out / "model_index.json", json.dumps(_model_index(scheduler_cls.__name__), indent=2))
    else:
        log.info("no model_index.json (not a StableDiffusionPipeline): %s", blocker)
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
    """One ``.safetensors`` of the system's state dict; configs as string metadata.

    The weights are mmdiff's own (an EDM U-Net keeps its F output), so an EDM model's metadata has
    no diffusers ``scheduler_config``; its ``mmdiff`` entry holds the diffusion config.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--format safetensors writes a .safetensors file; '{out}' has another suffix.")
    if out.exists():
        raise UsageError(f"'{out}' exists; pass a new file name.")
    out.parent.mkdir(parents=True, exist_ok=True)
    system = merged_copy(system).to("cpu").float()
    state = {k: v for k, v in _plain_state(system).items()
             if k.split(".")[0] in ("unet", "vae", "clip", "image_tokens") or k == "latent_scale"}
    info = export_info(system, ckpt, use_ema)
    metadata = {
        "format": "mmdiff-text_to_image",
        "mmdiff": json.dumps(info, default=str),
        "unet_config": json.dumps(dict(system.unet.config), default=list),
        "vae_config": json.dumps({**dict(system.vae.config), "scaling_factor": info["latent_scale"]},
                                 default=list),
        "text_encoder_config": json.dumps(_clip_export_config(system)),
    }
    if not info["edm_preconditioning"]:
        metadata["scheduler_config"] = json.dumps(
            scheduler_config(system.cfg, system.diffusion.schedule.alphas_cumprod))
    if getattr(system, "image_tokens", None) is not None:
        metadata["image_tokens_config"] = json.dumps(_image_tokens_config(system.image_tokens))
    with AtomicFile(out) as f:
        save_file(state, f.name, metadata=metadata)
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
