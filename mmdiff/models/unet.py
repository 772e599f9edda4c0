"""The denoiser: a diffusers ``UNet2DConditionModel`` built from ``model.unet`` or loaded.

Conditioning the system passes::

    out = unet(x_t, t, encoder_hidden_states=states,            # B×L×text_width (CLIP states)
               class_labels=pooled if uses_pooled_text(unet) else None).sample

- ``encoder_hidden_states`` are the text encoder's per-token states. When ``model.unet.
  cross_attention_dim`` is set and differs from the text width, the U-Net gets a learned linear
  projection from the text width to it (diffusers' ``encoder_hid_proj``, type ``text_proj``).
- With ``model.unet.use_pooled_text`` the pooled CLIP text embedding (B×``pooled_dim``) is
  projected by an MLP and *added to the timestep embedding* (diffusers
  ``class_embed_type="projection"``, the path that takes an arbitrary vector; diffusers'
  ``addition_embed_type="text"`` instead re-pools the token states itself, and ``"text_time"``
  needs SDXL's size/crop ids). It is then required on every call — pass the pooled embedding of
  the empty prompt for unconditional (CFG) rows.
- With ``time_cond_dim`` (the unCLIP decoder's ``model.image_embed_conditioning`` time/both) the
  U-Net gets diffusers' ``time_embedding.cond_proj``: a bias-free linear map of a B×``time_cond_dim``
  vector (the CLIP image embedding) added to the timestep features before the time-embedding MLP,
  passed as ``timestep_cond=``. It is zero-initialised, so a text-only U-Net fine-tuned with it
  starts out computing exactly what it did. (The pooled-text projection above cannot take a second
  vector without changing the shape of its weights, which would break initialising from a
  text-only checkpoint.)

``model.unet.attention_head_dim`` means what it says — channels per attention head — so a block
with C channels gets C / attention_head_dim heads. (diffusers' own config key of that name is,
for historical reasons, the number of heads; we translate.) A loaded diffusers folder keeps its
own config.

Output channels are the latent channels, or twice that with ``learned_variance=True``
(mean/ε prediction and the variance interpolation values, as in improved DDPM).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
import torch
from diffusers import UNet2DConditionModel
from omegaconf import DictConfig

from mmdiff.io.weights import ignored_key, load_state_dict_file, load_strict
from mmdiff.errors import CheckpointError, ConfigError
from mmdiff.models.dtypes import diffusers_folder

log = logging.getLogger(__name__)

CKPT_PREFIX = "unet."


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _arch_kwargs(
    cfg: Any,
    latent_channels: int,
    sample_size: int,
    cross_attention_dim: int,
    pooled_dim: Optional[int],
    learned_variance: bool,
    time_cond_dim: Optional[int] = None,
) -> dict[str, Any]:
    channels = [int(c) for c in cfg.block_out_channels]
    head_dim = int(cfg.attention_head_dim)
    for c in channels:
        if c % head_dim:
            raise ConfigError(
                f"model.unet.block_out_channels {channels} are not all divisible by "
                f"model.unet.attention_head_dim {head_dim}."
            )
    groups = int(cfg.norm_num_groups)
    blind = [c for c in channels if c == groups]
    if blind:
        # GroupNorm with one channel per group removes each channel's spatial mean, and with it the
        # per-channel time (and pooled-text) embedding the ResNet blocks add just before norm2.
        log.warning("model.unet.norm_num_groups %d equals block width %s: the time embedding has no "
                    "effect at that level; use fewer groups (e.g. %d).", groups, blind, max(1, groups // 4))
    kwargs: dict[str, Any] = dict(
        sample_size=int(sample_size),
        in_channels=int(latent_channels),
        out_channels=int(latent_channels) * (2 if learned_variance else 1),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(channels),
        layers_per_block=int(cfg.layers_per_block),
        # diffusers' "attention_head_dim" is the number of heads (see module docstring).
        attention_head_dim=tuple(c // head_dim for c in channels),
        transformer_layers_per_block=int(cfg.transformer_layers_per_block),
        norm_num_groups=int(cfg.norm_num_groups),
        cross_attention_dim=int(cross_attention_dim),
        use_linear_projection=bool(cfg.use_linear_projection),
    )
    if time_cond_dim is not None:
        kwargs["time_cond_proj_dim"] = int(time_cond_dim)
    if cfg.cross_attention_dim is not None and int(cfg.cross_attention_dim) != int(cross_attention_dim):
        kwargs.update(
            cross_attention_dim=int(cfg.cross_attention_dim),
            encoder_hid_dim=int(cross_attention_dim),
            encoder_hid_dim_type="text_proj",
        )
    if cfg.use_pooled_text:
        if pooled_dim is None:
            raise ConfigError(
                "model.unet.use_pooled_text is true but the text encoder gives no pooled embedding."
            )
        kwargs.update(
            class_embed_type="projection", projection_class_embeddings_input_dim=int(pooled_dim)
        )
    return kwargs


def uses_pooled_text(unet: UNet2DConditionModel) -> bool:
    """True when ``unet`` must be called with ``class_labels=pooled_text``."""
    return unet.config.class_embed_type == "projection"


def _check_loaded(
    unet: UNet2DConditionModel,
    source: str,
    latent_channels: int,
    cross_attention_dim: int,
    pooled_dim: Optional[int],
    learned_variance: bool,
    want_pooled: bool,
) -> None:
    c = unet.config
    out = latent_channels * (2 if learned_variance else 1)
    problems = []
    if c.in_channels != latent_channels or c.out_channels != out:
        problems.append(
            f"it maps {c.in_channels}→{c.out_channels} channels but this model needs "
            f"{latent_channels}→{out}"
        )
    text_dim = c.encoder_hid_dim if c.encoder_hid_dim is not None else c.cross_attention_dim
    if isinstance(text_dim, int) and text_dim != cross_attention_dim:
        problems.append(
            f"it expects text states of width {text_dim}, the text encoder gives {cross_attention_dim}"
        )
    if want_pooled and not uses_pooled_text(unet):
        problems.append("it has no pooled-text embedding but model.unet.use_pooled_text is true")
    if uses_pooled_text(unet) and pooled_dim is not None:
        if c.projection_class_embeddings_input_dim != pooled_dim:
            problems.append(
                f"its pooled-text input is {c.projection_class_embeddings_input_dim}-d, "
                f"the text encoder gives {pooled_dim}"
            )
    if problems:
        raise CheckpointError(f"U-Net '{source}' does not fit this model: {'; '.join(problems)}.")


LDM_PREFIX = "model.diffusion_model."


def _is_ldm_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(LDM_PREFIX) or k.startswith("input_blocks.") for k in state)


def _from_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The original CompVis/Stable Diffusion U-Net layout (``model.diffusion_model.input_blocks…``,
    or the same keys without the prefix) in diffusers names, by diffusers' own converter."""
    ldm = {k if k.startswith(LDM_PREFIX) else LDM_PREFIX + k: v for k, v in state.items()
           if k.startswith(LDM_PREFIX) or not k.startswith(("first_stage_model.", "cond_stage_model."))}
    try:
        return convert_ldm_unet_checkpoint(ldm, dict(config))
    except (KeyError, IndexError, ValueError) as err:
        raise CheckpointError(
            f"the CompVis/SD-layout U-Net weights do not fit the configured architecture ({_first_line(err)})."
        ) from None


def _state_from_file(path: Path, config: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    state = load_state_dict_file(path)
    if _is_ldm_layout(state):
        return _from_ldm(state, config)
    if not any(k.startswith("conv_in.") for k in state):
        unet_keys = {k[len(CKPT_PREFIX):]: v for k, v in state.items() if k.startswith(CKPT_PREFIX)}
        if unet_keys:  # an mmdiff text_to_image checkpoint: keep the U-Net's weights
            return unet_keys
    return state


def check_projection_layout(state: Mapping[str, torch.Tensor], use_linear: bool, source: str) -> None:
    """One sentence when ``state``'s transformer projections are the other kind (SD 1.x 1×1
    convolutions against SD 2.x linear layers) than ``model.unet.use_linear_projection`` builds,
    instead of a list of shape mismatches. ``source`` names the weights in the message."""
    proj = next((v for k, v in state.items() if k.endswith("proj_in.weight")), None)
    if proj is None or (proj.ndim == 2) == use_linear:
        return
    kind, setting = ("linear (Stable Diffusion 2.x layout)", "true") if proj.ndim == 2 else (
        "1×1 convolutions (Stable Diffusion 1.x layout)", "false")
    raise CheckpointError(
        f"{source} has U-Net transformer projections that are {kind}; set "
        f"model.unet.use_linear_projection: {setting}."
    )


def build_unet(
    cfg: DictConfig,
    latent_channels: int,
    sample_size: int,
    cross_attention_dim: int,
    pooled_dim: Optional[int] = None,
    learned_variance: bool = False,
    time_cond_dim: Optional[int] = None,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` from a ``model.unet`` section (see the module docstring).

    ``cross_attention_dim`` is the text encoder's state width, ``pooled_dim`` its pooled
    embedding size (used only with ``use_pooled_text``), ``sample_size`` the latent side length,
    ``time_cond_dim`` the size of a vector added to the time embedding (see the module docstring).
    ``pretrained`` may be a local diffusers folder (or a pipeline folder with ``unet/``) or a
    state-dict file (``.safetensors``/``.pt``/``.bin``, or an mmdiff ``.ckpt`` whose ``unet.*``
    weights are taken) in diffusers key names, or in the original CompVis/SD single-file layout
    (``model.diffusion_model.*``, converted by diffusers), for the architecture the config
    describes. ``ignore_keys`` names weights the strict load may skip.
    Returned in fp32 and eval mode.
    """
    if cfg.pretrained is None:
        kwargs = _arch_kwargs(
            cfg, latent_channels, sample_size, cross_attention_dim, pooled_dim, learned_variance,
            time_cond_dim,
        )
        unet = UNet2DConditionModel(**kwargs).eval()
        if unet.time_embedding.cond_proj is not None:
            torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
        return unet
    if time_cond_dim is not None:
        raise ConfigError(
            "model.image_embed_conditioning time/both builds a new U-Net input and cannot load "
            "model.unet.pretrained; initialise from a checkpoint with model.init_from instead."
        )
    path = Path(str(cfg.pretrained)).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"U-Net weights '{cfg.pretrained}' do not exist; set model.unet.pretrained to a "
            "diffusers folder or a .safetensors file, or to null for random init."
        )
    if path.is_dir():
        folder, sub = diffusers_folder(path, "unet")
        try:
            unet, info = UNet2DConditionModel.from_pretrained(
                str(folder), subfolder=sub, local_files_only=True, output_loading_info=True,
                low_cpu_mem_usage=False,
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"U-Net folder '{path}' is not a loadable diffusers UNet2DConditionModel folder "
                f"({_first_line(err)})."
            ) from None
        ignore = list(cfg.get("ignore_keys") or [])
        bad = {k: [key for key in v if not ignored_key(str(key), ignore)] if k != "error_msgs" else v
               for k, v in info.items()}
        bad = {k: v for k, v in bad.items() if v}
        if bad:
            detail = "; ".join(f"{k}: {', '.join(map(str, v[:4]))}" for k, v in bad.items())
            raise CheckpointError(f"U-Net weights in '{path}' do not fit their config ({detail}).")
    else:
        kwargs = _arch_kwargs(
            cfg, latent_channels, sample_size, cross_attention_dim, pooled_dim, learned_variance
        )
        unet = UNet2DConditionModel(**kwargs)
        state = _state_from_file(path, unet.config)
        check_projection_layout(state, bool(cfg.use_linear_projection), f"U-Net file '{path}'")
        load_strict(unet, state, f"U-Net ('{path}')",
                    ignore_keys=list(cfg.get("ignore_keys") or []))
    _check_loaded(
        unet, str(path), latent_channels, cross_attention_dim, pooled_dim, learned_variance,
        bool(cfg.use_pooled_text),
    )
    log.info("loaded U-Net weights from %s", path)
    return unet.eval()


__all__ = ["build_unet", "check_projection_layout", "uses_pooled_text", "CKPT_PREFIX"]
