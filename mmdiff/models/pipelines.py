"""The networks of a Stable Diffusion pipeline folder (``model.pretrained``), as mmdiff uses them.

:func:`load_pipeline_components` reads a diffusers pipeline folder (SD 1.x, 2.x, XL; see
:mod:`mmdiff.config.pipeline` for what decides the family): the ``AutoencoderKL``, the
``UNet2DConditionModel`` and the transformers CLIP text encoder(s), converted exactly into open_clip
towers behind :class:`~mmdiff.models.pipeline_text.PipelineTextEncoder` with the family's reading
(SD 1.x/2.x: the last layer through the final LayerNorm; SDXL: both encoders' penultimate layers
without it, concatenated, and the second encoder's projected pooled text).

:func:`build_pipeline_components` rebuilds the same architecture from :attr:`PipelineParts.meta`
(plain containers a checkpoint keeps) without the folder; the weights then come from the checkpoint.
Every load is strict: weights that do not fit their config are a :class:`CheckpointError`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from diffusers import AutoencoderKL, UNet2DConditionModel

from mmdiff.config.pipeline import PipelineInfo
from mmdiff.errors import CheckpointError
from mmdiff.models.hf_text import TextEncoderSpec
from mmdiff.models.pipeline_text import PipelineTextEncoder

log = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def plain_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A diffusers config as plain lists/dicts (checkpoints load with ``weights_only=True``)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items()}


@dataclass
class PipelineParts:
    """A pipeline's networks and ``meta``: what rebuilding them needs without the folder."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text: PipelineTextEncoder
    meta: Dict[str, Any]

    @property
    def micro_conditioning(self) -> bool:
        """True when the U-Net takes SDXL's pooled text + size/crop ids (``added_cond_kwargs``)."""
        return uses_time_ids(self.unet)


def uses_time_ids(unet: UNet2DConditionModel) -> bool:
    """True for an SDXL-style U-Net: called with ``added_cond_kwargs={"text_embeds", "time_ids"}``."""
    return unet.config.addition_embed_type == "text_time"


def _strict(model_cls: Any, folder: Path, subfolder: str, what: str) -> Any:
    try:
        model, info = model_cls.from_pretrained(
            str(folder), subfolder=subfolder, local_files_only=True, output_loading_info=True,
            low_cpu_mem_usage=False,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{what} in '{folder / subfolder}' cannot be loaded ({_first_line(err)}).") from None
    bad = {k: v for k, v in info.items() if v}
    if bad:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:4]))}" for k, v in bad.items())
        raise CheckpointError(f"{what} weights in '{folder / subfolder}' do not fit their config ({detail}).")
    return model.eval()


def _text_models(folder: Path, info: PipelineInfo) -> list:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # heavy; pipelines only

    models = []
    for text in info.text_encoders:
        cls = CLIPTextModelWithProjection if text.with_projection else CLIPTextModel
        try:
            model, loading = cls.from_pretrained(str(folder / text.subfolder), local_files_only=True,
                                                 output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"text encoder '{folder / text.subfolder}' cannot be loaded "
                                  f"({_first_line(err)}).") from None
        # position_ids buffers are rebuilt by transformers; anything else missing is a real gap.
        bad = {k: [n for n in v if "position_ids" not in str(n)] for k, v in loading.items() if k != "error_msgs"}
        bad = {k: v for k, v in bad.items() if v}
        if bad or loading.get("error_msgs"):
            detail = "; ".join(f"{k}: {', '.join(map(str, v[:4]))}" for k, v in bad.items())
            raise CheckpointError(f"text encoder weights in '{folder / text.subfolder}' do not fit their config ({detail}).")
        models.append(model.eval())
    return models


def load_pipeline_components(
    folder: str | Path, info: PipelineInfo, *, freeze_text: bool = True, text_precision: str = "fp32",
    scaling_factor: Optional[float] = None,
) -> PipelineParts:
    """The VAE, U-Net and text encoder(s) of a pipeline folder, all in fp32 and eval mode.

    ``scaling_factor`` (the config's ``model.vae.scaling_factor``) is written into the VAE's config
    when given; ``freeze_text``/``text_precision`` are ``model.clip.freeze``/``precision``.
    """
    path = Path(str(folder)).expanduser()
    vae = _strict(AutoencoderKL, path, "vae", "VAE")
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(scaling_factor))
    unet = _strict(UNet2DConditionModel, path, "unet", "U-Net")
    models = _text_models(path, info)
    last = info.family != "sdxl"
    specs = [
        TextEncoderSpec.from_hf(model, hidden_layer=-1 if last else -2, final_layer_norm=last,
                                pad_token=text.pad_token, context_length=text.context_length)
        for model, text in zip(models, info.text_encoders)
    ]
    text = PipelineTextEncoder.from_hf(models, specs, freeze=freeze_text, precision=text_precision)
    del models
    log.info("loaded %s pipeline %s (%d text encoder(s))", info.family, path, len(specs))
    meta = {"family": info.family, "unet_config": plain_config(unet.config), "text_specs": text.specs,
            "force_zeros_for_empty_prompt": bool(info.force_zeros_for_empty_prompt)}
    return PipelineParts(vae=vae, unet=unet, text=text, meta=meta)


def build_pipeline_components(
    meta: Mapping[str, Any], vae_config: Mapping[str, Any], *, freeze_text: bool = True,
    text_precision: str = "fp32",
) -> PipelineParts:
    """The architecture :func:`load_pipeline_components` returned, rebuilt from its ``meta`` and the
    VAE's config (random init; load a checkpoint's state dict into it)."""
    try:
        vae = AutoencoderKL.from_config(dict(vae_config))
        unet = UNet2DConditionModel.from_config(dict(meta["unet_config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the saved pipeline configs cannot be rebuilt ({_first_line(err)}).") from None
    text = PipelineTextEncoder.from_specs(list(meta["text_specs"]), freeze=freeze_text, precision=text_precision)
    return PipelineParts(vae=vae.eval(), unet=unet.eval(), text=text, meta=dict(meta))


__all__ = ["PipelineParts", "load_pipeline_components", "build_pipeline_components", "plain_config",
           "uses_time_ids"]
