"""The text side of an exported model fine-tuned from ``model.pretrained``: its family's own layout.

A ``text_to_image`` system built from a Stable Diffusion pipeline folder keeps its text encoder(s)
as open_clip towers (:class:`~mmdiff.models.pipeline_text.PipelineTextEncoder`). On export they go
back to what the source pipeline held, so ``DiffusionPipeline.from_pretrained(OUT)`` is the same
class as the source and reads the encoders as mmdiff trained the U-Net on them:

- SD 1.x / 2.x (``StableDiffusionPipeline``): ``text_encoder/`` (transformers ``CLIPTextModel``,
  read at ``last_hidden_state``) and ``tokenizer/`` (padding as the source: ``<|endoftext|>`` for
  SD 1.x, ``!`` for SD 2.x); no safety checker.
- SDXL (``StableDiffusionXLPipeline``): ``text_encoder/`` (``CLIPTextModel``) and
  ``text_encoder_2/`` (``CLIPTextModelWithProjection``, whose ``text_embeds`` are the pooled
  text), ``tokenizer/`` and ``tokenizer_2/``, read at ``hidden_states[-2]``;
  ``force_zeros_for_empty_prompt`` as the source had it.

Each tower converts back weight for weight with
:func:`~mmdiff.models.hf_text.hf_from_text_transformer` over its spec's ``hf_config`` (token ids,
init ranges), so a trained text encoder (``model.clip.freeze: false``) leaves with its new weights.
The U-Net, VAE and scheduler are written by :func:`mmdiff.inference.export.export_folder`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import diffusers

from mmdiff.config.pipeline import FAMILY_CLASSES, TEXT_FOLDERS
from mmdiff.errors import CheckpointError
from mmdiff.models.clip_tokenizer import write_clip_tokenizer
from mmdiff.models.hf_text import TextEncoderSpec, hf_from_text_transformer
from mmdiff.models.pipeline_text import PipelineTextEncoder

log = logging.getLogger(__name__)

# How each family's pipeline reads its encoders: (hidden_layer, final_layer_norm).
_FAMILY_READING = {"sd1": (-1, True), "sd2": (-1, True), "sdxl": (-2, False)}


def pipeline_family(system: Any) -> Optional[str]:
    """``sd1``/``sd2``/``sdxl`` for a system built from ``model.pretrained``, else None.

    Raises :class:`CheckpointError` when its text encoders are not read the way that family's
    pipeline reads them (the exported pipeline would feed the U-Net other states).
    """
    meta = (getattr(system, "hparams", None) or {}).get("pipeline")
    if meta is None or not isinstance(getattr(system, "clip", None), PipelineTextEncoder):
        return None
    family = str(meta.get("family"))
    if family not in FAMILY_CLASSES:
        raise CheckpointError(f"the checkpoint's pipeline family '{family}' is unknown; expected one of "
                              f"{', '.join(FAMILY_CLASSES)}.")
    _check_reading(family, [TextEncoderSpec.from_dict(spec) for spec in system.clip.specs])
    return family


def _check_reading(family: str, specs: List[TextEncoderSpec]) -> None:
    """The exported pipeline reads its encoders its own way; the trained U-Net must have read them so."""
    folders = TEXT_FOLDERS[family]
    if len(specs) != len(folders):
        raise CheckpointError(f"a {family} pipeline has {len(folders)} text encoder(s); this model has {len(specs)}.")
    want = _FAMILY_READING[family]
    for spec in specs:
        if (int(spec.hidden_layer), bool(spec.final_layer_norm)) != want:
            raise CheckpointError(
                f"this model reads text layer {spec.hidden_layer} (final LayerNorm {spec.final_layer_norm}), "
                f"which a {FAMILY_CLASSES[family]} does not feed its U-Net; it cannot be exported as one."
            )
    if family == "sdxl" and not specs[-1].with_projection:
        raise CheckpointError("an SDXL pipeline's second text encoder needs its text projection (the pooled "
                              "text); this model's has none.")


def write_pipeline_text_encoders(system: Any, out: Path, family: str) -> List[str]:
    """Write ``text_encoder[_2]/`` and ``tokenizer[_2]/`` of ``family``; returns the encoder classes."""
    text: PipelineTextEncoder = system.clip
    specs = [TextEncoderSpec.from_dict(s) for s in text.specs]
    _check_reading(family, specs)
    classes = []
    for (encoder_dir, tokenizer_dir), tower, spec in zip(TEXT_FOLDERS[family], text.towers, specs):
        model = hf_from_text_transformer(tower, with_projection=spec.with_projection, hf_config=spec.hf_config)
        model.save_pretrained(out / encoder_dir, safe_serialization=True)
        # The source tokenizer's padding: SD 1.x pads with <|endoftext|>, SD 2.x (and SDXL's second) with "!".
        write_clip_tokenizer(out / tokenizer_dir, pad_token=spec.pad_token, model_max_length=spec.context_length)
        classes.append(type(model).__name__)
    return classes


def family_model_index(family: str, scheduler_class: str, encoder_classes: List[str],
                       force_zeros_for_empty_prompt: bool) -> Dict[str, Any]:
    """``model_index.json`` of ``family``'s pipeline class (no safety checker, no image encoder)."""
    index: Dict[str, Any] = {
        "_class_name": FAMILY_CLASSES[family],
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for (encoder_dir, tokenizer_dir), encoder_class in zip(TEXT_FOLDERS[family], encoder_classes):
        index[encoder_dir] = ["transformers", encoder_class]
        index[tokenizer_dir] = ["transformers", "CLIPTokenizer"]
    if family == "sdxl":
        index["force_zeros_for_empty_prompt"] = bool(force_zeros_for_empty_prompt)
    else:
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    return dict(sorted(index.items()))


__all__ = ["pipeline_family", "write_pipeline_text_encoders", "family_model_index"]
