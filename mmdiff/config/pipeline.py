"""``model.pretrained``: what a diffusers Stable Diffusion pipeline folder says, read from its JSON.

A pipeline folder (``save_pretrained`` output: ``model_index.json`` plus one folder per component)
sets the VAE, the U-Net, the text encoder(s) and the noise schedule of a ``text_to_image`` model
at once. This module reads only the JSON files (no torch), so ``mmdiff config`` and config errors
stay fast:

- :func:`read_pipeline_info` → :class:`PipelineInfo`: the family (``sd1``, ``sd2`` or ``sdxl``), the
  scheduler, VAE and U-Net configs, and per text encoder its config, padding token and length;
- :func:`pipeline_values` → the config values the folder implies (dotted keys), which
  :func:`apply_pipeline` merges *under* the user's own keys (a key the user set wins: e.g.
  ``diffusion.prediction_type`` for fine-tuning into v-prediction, or any ``sampling.*`` option);
- keys that contradict the folder (the U-Net or VAE architecture, another ``pretrained`` weight
  source, a learned variance the U-Net has no channels for) are refused in one line.

Families: ``StableDiffusionPipeline`` is SD 1.x when its text encoder is OpenAI's CLIP (tokenizer
padding with ``<|endoftext|>``, ``quick_gelu``) and SD 2.x when it is an OpenCLIP conversion
(padding with ``!``, ``gelu``); ``StableDiffusionXLPipeline`` is SDXL (two text encoders, the U-Net
conditioned on the pooled text and size/crop ids).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from mmdiff.config.schema import schema
from mmdiff.errors import ConfigError

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl")
_PIPELINE_CLASSES = {"StableDiffusionPipeline": ("sd1", "sd2"), "StableDiffusionXLPipeline": ("sdxl",)}
#: The diffusers pipeline class of each family (what model_index.json names).
FAMILY_CLASSES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                  "sdxl": "StableDiffusionXLPipeline"}
#: Pipeline components per family: (text encoder folder, tokenizer folder) pairs.
TEXT_FOLDERS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "sd1": (("text_encoder", "tokenizer"),),
    "sd2": (("text_encoder", "tokenizer"),),
    "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}
CLIP_VOCAB_SIZE = 49408  # the CLIP BPE vocabulary every SD text encoder uses (mmdiff bundles it)
EOS_TOKEN = "<|endoftext|>"
# diffusers scheduler class → the mmdiff sampler that reproduces it (classes not listed: the
# config's sampler stays; their schedule values still apply).
_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
# diffusers beta_schedule → mmdiff diffusion.beta_schedule.
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                   "sigmoid": "sigmoid"}

#: User keys that contradict model.pretrained: the folder holds these networks' architectures and weights.
CONTRADICTING_KEYS: Tuple[str, ...] = (
    "model.vae.pretrained", "model.unet.pretrained", "model.clip.pretrained", "model.init_from",
    "model.clip.name", "model.clip.arch", "model.clip.text_layer",
    "model.vae.in_channels", "model.vae.latent_channels", "model.vae.block_out_channels",
    "model.vae.layers_per_block", "model.vae.norm_num_groups",
    "model.unet.block_out_channels", "model.unet.down_block_types", "model.unet.up_block_types",
    "model.unet.layers_per_block", "model.unet.attention_head_dim", "model.unet.transformer_layers_per_block",
    "model.unet.norm_num_groups", "model.unet.cross_attention_dim", "model.unet.use_pooled_text",
    "model.unet.use_linear_projection",
)


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder of a pipeline: its folders, transformers config and tokenizer settings."""

    subfolder: str
    tokenizer_subfolder: str
    config: Dict[str, Any]
    pad_token: str
    context_length: int

    @property
    def with_projection(self) -> bool:
        """A ``CLIPTextModelWithProjection`` (SDXL's second encoder: the pooled text is projected)."""
        return "CLIPTextModelWithProjection" in (self.config.get("architectures") or [])

    @property
    def width(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def pooled_dim(self) -> int:
        return int(self.config.get("projection_dim") or self.width) if self.with_projection else self.width


@dataclass(frozen=True)
class PipelineInfo:
    """What ``model_index.json`` and the component configs of a pipeline folder say."""

    folder: str
    family: str
    class_name: str
    scheduler: Dict[str, Any]
    vae: Dict[str, Any]
    unet: Dict[str, Any]
    text_encoders: Tuple[TextEncoderInfo, ...]
    force_zeros_for_empty_prompt: bool = False
    index: Dict[str, Any] = field(default_factory=dict)

    @property
    def vae_factor(self) -> int:
        """The VAE's spatial down-sampling factor."""
        return 2 ** (len(self.vae.get("block_out_channels") or [0]) - 1)

    @property
    def image_size(self) -> int:
        """The resolution the U-Net was made for (its latent ``sample_size`` × the VAE factor)."""
        size = self.unet.get("sample_size") or 64
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_factor


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"model.pretrained: the pipeline folder has no {what} '{path}'; pass a complete "
                          "diffusers pipeline folder (save_pretrained output).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"model.pretrained: '{path}' is not readable JSON ({type(err).__name__}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.pretrained: '{path}' must hold a JSON object.")
    return data


def _component(folder: Path, index: Dict[str, Any], name: str) -> Path:
    """The folder of component ``name``, which model_index.json must list (not null)."""
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise ConfigError(f"model.pretrained: '{folder / 'model_index.json'}' lists no '{name}' component; "
                          "pass a complete Stable Diffusion pipeline folder.")
    sub = folder / name
    if not sub.is_dir():
        raise ConfigError(f"model.pretrained: the pipeline folder has no '{sub}' folder for its '{name}' component.")
    return sub


def _token_text(value: Any) -> Optional[str]:
    """A special token as transformers saves it: a string, or a dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_settings(folder: Path) -> Tuple[str, int]:
    """(padding token, model_max_length) of a CLIPTokenizer folder."""
    config = _read_json(folder / "tokenizer_config.json", "tokenizer config")
    specials_path = folder / "special_tokens_map.json"
    specials = _read_json(specials_path, "special tokens map") if specials_path.is_file() else {}
    pad = _token_text(specials.get("pad_token")) or _token_text(config.get("pad_token"))
    if pad is None:  # transformers 5 may keep the token text in added_tokens_decoder only
        added = config.get("added_tokens_decoder") or {}
        pad_id = config.get("pad_token_id")
        pad = _token_text(added.get(str(pad_id))) if pad_id is not None else None
    if pad is None:
        raise ConfigError(f"model.pretrained: the tokenizer in '{folder}' names no pad_token.")
    length = config.get("model_max_length", 77)
    if not isinstance(length, int) or not 0 < length <= 10_000:
        raise ConfigError(f"model.pretrained: the tokenizer in '{folder}' has model_max_length {length!r}; "
                          "expected the text encoder's context length (77).")
    return pad, int(length)


def _text_encoder(folder: Path, index: Dict[str, Any], encoder: str, tokenizer: str) -> TextEncoderInfo:
    config = _read_json(_component(folder, index, encoder) / "config.json", f"{encoder} config")
    pad, length = _tokenizer_settings(_component(folder, index, tokenizer))
    if int(config.get("vocab_size", CLIP_VOCAB_SIZE)) != CLIP_VOCAB_SIZE:
        raise ConfigError(f"model.pretrained: '{folder / encoder}' has a vocabulary of {config.get('vocab_size')} "
                          f"tokens, not CLIP's {CLIP_VOCAB_SIZE} (added tokens are not supported).")
    if length > int(config.get("max_position_embeddings", length)):
        raise ConfigError(f"model.pretrained: '{folder / tokenizer}' pads to {length} tokens but '{folder / encoder}' "
                          f"has only {config.get('max_position_embeddings')} positions.")
    return TextEncoderInfo(encoder, tokenizer, config, pad, length)


def _sd_family(text: TextEncoderInfo) -> str:
    """SD 1.x (OpenAI CLIP: end-of-text padding) or SD 2.x (OpenCLIP: '!' padding)."""
    if text.pad_token == EOS_TOKEN:
        return "sd1"
    if text.pad_token == "!":
        return "sd2"
    return "sd1" if text.config.get("hidden_act") == "quick_gelu" else "sd2"


def read_pipeline_info(folder: str | Path) -> PipelineInfo:
    """Read a Stable Diffusion (1.x, 2.x, XL) diffusers pipeline folder's JSON files.

    Raises :class:`ConfigError` (one line naming the path) for a missing folder, file or component
    and for pipelines of other kinds (e.g. ``FluxPipeline``, SDXL refiners, inpainting U-Nets).
    """
    path = Path(str(folder)).expanduser()
    if path.is_file() and path.suffix in (".safetensors", ".ckpt"):
        raise ConfigError(f"model.pretrained '{folder}' is a single-file checkpoint; convert it to a pipeline "
                          "folder once with diffusers' (StableDiffusionPipeline or StableDiffusionXLPipeline)"
                          ".from_single_file(FILE).save_pretrained(DIR) and pass DIR.")
    if not path.is_dir():
        raise ConfigError(f"model.pretrained '{folder}' is not a folder; pass a diffusers pipeline folder "
                          "(with model_index.json).")
    index = _read_json(path / "model_index.json", "model_index.json")
    class_name = str(index.get("_class_name"))
    if class_name not in _PIPELINE_CLASSES:
        raise ConfigError(f"model.pretrained: '{path / 'model_index.json'}' is a {class_name}; supported are "
                          f"{', '.join(_PIPELINE_CLASSES)} (Stable Diffusion 1.x, 2.x and XL).")
    sdxl = class_name == "StableDiffusionXLPipeline"
    folders = TEXT_FOLDERS["sdxl" if sdxl else "sd1"]
    if sdxl and not (isinstance(index.get("text_encoder"), list) and index["text_encoder"][1] is not None):
        raise ConfigError(f"model.pretrained: '{path}' is an SDXL pipeline without a first text encoder "
                          "(a refiner); only SDXL base pipelines are supported.")
    texts = tuple(_text_encoder(path, index, enc, tok) for enc, tok in folders)
    family = "sdxl" if sdxl else _sd_family(texts[0])
    info = PipelineInfo(
        folder=str(path),
        family=family,
        class_name=class_name,
        scheduler=_read_json(_component(path, index, "scheduler") / "scheduler_config.json", "scheduler config"),
        vae=_read_json(_component(path, index, "vae") / "config.json", "VAE config"),
        unet=_read_json(_component(path, index, "unet") / "config.json", "U-Net config"),
        text_encoders=texts,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)) and sdxl,
        index=index,
    )
    _check_consistent(info)
    return info


def _check_consistent(info: PipelineInfo) -> None:
    """The components must fit together as the family's pipeline uses them."""
    u, where = info.unet, Path(info.folder) / "unet" / "config.json"
    if u.get("in_channels") != info.vae.get("latent_channels") or u.get("out_channels") != info.vae.get("latent_channels"):
        raise ConfigError(f"model.pretrained: '{where}' maps {u.get('in_channels')}→{u.get('out_channels')} channels "
                          f"but the VAE has {info.vae.get('latent_channels')} latent channels (inpainting and "
                          "depth U-Nets are not supported).")
    width = sum(t.width for t in info.text_encoders)
    if u.get("cross_attention_dim") != width or u.get("encoder_hid_dim") is not None:
        raise ConfigError(f"model.pretrained: '{where}' attends to text states of width {u.get('cross_attention_dim')} "
                          f"but the text encoder(s) give {width}.")
    if u.get("class_embed_type") is not None or u.get("time_cond_proj_dim") is not None:
        raise ConfigError(f"model.pretrained: '{where}' has class or timestep-condition embeddings "
                          "that Stable Diffusion pipelines do not feed; not supported.")
    want = "text_time" if info.family == "sdxl" else None
    if u.get("addition_embed_type") != want:
        raise ConfigError(f"model.pretrained: '{where}' has addition_embed_type {u.get('addition_embed_type')!r}; "
                          f"a {info.class_name} U-Net needs {want!r}.")
    if want == "text_time":
        ids = 6 * int(u.get("addition_time_embed_dim") or 0) + info.text_encoders[-1].pooled_dim
        if u.get("projection_class_embeddings_input_dim") != ids:
            raise ConfigError(f"model.pretrained: '{where}' takes {u.get('projection_class_embeddings_input_dim')} "
                              f"added-condition features, the pooled text and 6 size/crop ids give {ids}.")


# ------------------------------------------------------------------------------ config values
def _schedule_values(info: PipelineInfo) -> Dict[str, Any]:
    s, where = info.scheduler, Path(info.folder) / "scheduler" / "scheduler_config.json"
    values: Dict[str, Any] = {}
    betas = s.get("trained_betas")
    if betas:
        values.update({"diffusion.beta_schedule": "custom", "diffusion.betas": [float(b) for b in betas]})
    else:
        kind = s.get("beta_schedule", "linear")
        if kind not in _BETA_SCHEDULES:
            raise ConfigError(f"model.pretrained: '{where}' has beta_schedule '{kind}', which mmdiff cannot "
                              f"express; supported: {', '.join(_BETA_SCHEDULES)} or trained_betas.")
        values["diffusion.beta_schedule"] = _BETA_SCHEDULES[kind]
    if s.get("thresholding"):
        raise ConfigError(f"model.pretrained: '{where}' uses dynamic thresholding, which mmdiff's samplers lack.")
    prediction = s.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ConfigError(f"model.pretrained: '{where}' has prediction_type '{prediction}'; expected epsilon, "
                          "v_prediction or sample.")
    values.update({
        "diffusion.num_train_timesteps": int(s.get("num_train_timesteps", 1000)),
        "diffusion.beta_start": float(s.get("beta_start", 0.0001)),
        "diffusion.beta_end": float(s.get("beta_end", 0.02)),
        "diffusion.prediction_type": prediction,
        "diffusion.zero_terminal_snr": bool(s.get("rescale_betas_zero_snr", False)),
        "sampling.timestep_spacing": str(s.get("timestep_spacing", "leading")),
        "sampling.steps_offset": int(s.get("steps_offset", 0)),
        "sampling.set_alpha_to_one": bool(s.get("set_alpha_to_one", True)),
    })
    if values["sampling.timestep_spacing"] not in ("linspace", "leading", "trailing"):
        raise ConfigError(f"model.pretrained: '{where}' has timestep_spacing '{values['sampling.timestep_spacing']}'; "
                          "mmdiff knows linspace, leading and trailing.")
    sampler = _SAMPLERS.get(str(s.get("_class_name")))
    if sampler in ("euler", "dpmpp_2m") and s.get("use_karras_sigmas"):
        sampler += "_karras"
    if sampler is not None:
        values["sampling.sampler"] = sampler
    if s.get("clip_sample"):
        values["sampling.clip_denoised"] = float(s.get("clip_sample_range", 1.0))
    return values


def _arch_values(info: PipelineInfo) -> Dict[str, Any]:
    """The networks' architecture as far as the ``model.vae`` / ``model.unet`` keys can say it
    (for ``mmdiff config`` and the config checks; the networks themselves come from the folder)."""
    v, u = info.vae, info.unet
    values: Dict[str, Any] = {
        "model.vae.in_channels": int(v.get("in_channels", 3)),
        "model.vae.latent_channels": int(v.get("latent_channels", 4)),
        "model.vae.block_out_channels": [int(c) for c in v.get("block_out_channels", [])],
        "model.vae.layers_per_block": int(v.get("layers_per_block", 1)),
        "model.vae.norm_num_groups": int(v.get("norm_num_groups", 32)),
        "model.unet.block_out_channels": [int(c) for c in u.get("block_out_channels", [])],
        "model.unet.down_block_types": list(u.get("down_block_types", [])),
        "model.unet.up_block_types": list(u.get("up_block_types", [])),
        "model.unet.norm_num_groups": int(u.get("norm_num_groups", 32)),
        "model.unet.cross_attention_dim": int(u["cross_attention_dim"]),
        "model.unet.use_linear_projection": bool(u.get("use_linear_projection", False)),
    }
    if isinstance(u.get("layers_per_block"), int):
        values["model.unet.layers_per_block"] = u["layers_per_block"]
    return values


def pipeline_values(info: PipelineInfo) -> Dict[str, Any]:
    """The config values (dotted keys) a pipeline folder implies; :func:`apply_pipeline` merges them
    under the user's keys."""
    values = {**_schedule_values(info), **_arch_values(info)}
    scale = info.vae.get("scaling_factor")
    if scale is not None:
        values["model.vae.scaling_factor"] = float(scale)
    if info.vae.get("shift_factor") not in (None, 0, 0.0) or info.vae.get("latents_mean") is not None:
        raise ConfigError(f"model.pretrained: '{Path(info.folder) / 'vae' / 'config.json'}' shifts or normalises "
                          "latents per channel, which mmdiff's latent scale does not.")
    values["data.image_size"] = info.image_size
    return values


def _same(value: Any, reference: Any) -> bool:
    """Equal as plain containers (sections and lists compare by content)."""
    plain = [OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for v in (value, reference)]
    return plain[0] == plain[1]


def apply_pipeline(cfg: DictConfig, info: PipelineInfo, is_set: Callable[[str], bool]) -> DictConfig:
    """Merge the pipeline's values into ``cfg`` under the keys the user set (``is_set(dotted)``).

    Raises :class:`ConfigError` for a user key that contradicts the folder (see
    :data:`CONTRADICTING_KEYS`), a learned variance, or image-embedding conditioning.
    """
    values = pipeline_values(info)
    defaults = schema()
    for key in CONTRADICTING_KEYS:
        # A run's saved config.yaml repeats every key: the schema's defaults and what the folder
        # filled in are no contradiction, so `mmdiff fit RUN_DIR/config.yaml` loads again.
        if is_set(key) and not _same(OmegaConf.select(cfg, key), values.get(key, OmegaConf.select(defaults, key))):
            raise ConfigError(f"{key} cannot be set together with model.pretrained (the pipeline folder "
                              f"'{info.folder}' holds the networks); remove one of them.")
    if OmegaConf.select(cfg, "diffusion.variance_type") == "learned_range":
        raise ConfigError("diffusion.variance_type learned_range needs twice the latent channels out of the "
                          "U-Net; a Stable Diffusion U-Net from model.pretrained predicts one set.")
    if OmegaConf.select(cfg, "model.image_embed_conditioning") not in (None, "none"):
        raise ConfigError("model.image_embed_conditioning builds new U-Net inputs; it cannot be combined with "
                          "model.pretrained.")
    for key, value in values.items():
        if is_set(key):
            if OmegaConf.select(cfg, key) != value:
                log.info("%s: keeping your %r (the pipeline has %r)", key, OmegaConf.select(cfg, key), value)
            continue
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


__all__ = ["PipelineInfo", "TextEncoderInfo", "read_pipeline_info", "pipeline_values", "apply_pipeline",
           "FAMILIES", "FAMILY_CLASSES", "TEXT_FOLDERS", "CONTRADICTING_KEYS"]
