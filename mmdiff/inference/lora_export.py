"""Export a LoRA-trained text_to_image system: the adapters as diffusers reads them, or merged weights.

:func:`export_lora` writes ``OUT/pytorch_lora_weights.safetensors`` in the layout diffusers' own
LoRA training scripts save (``StableDiffusionLoraLoaderMixin.save_lora_weights``) and
``pipeline.load_lora_weights(OUT)`` reads: U-Net adapters under ``unet.`` with diffusers' module
names, text-encoder adapters under ``text_encoder.`` with transformers ``CLIPTextModel`` names
(open_clip ``transformer.resblocks.N.attn.out_proj`` → ``text_model.encoder.layers.N.self_attn.out_proj``,
``mlp.c_fc`` → ``mlp.fc1``, ``mlp.c_proj`` → ``mlp.fc2``). Rank, alpha and targets travel in the
file's adapter metadata, so an alpha other than the rank loads with its scale.

:func:`merged_copy` is what the normal export writes for a LoRA system: a copy with every adapter
folded into its base weight (at scale 1), saved like any other model.
"""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Dict, List

import torch
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from mmdiff.errors import UsageError
from mmdiff.io.atomic import AtomicFile
from mmdiff.models.lora import ADAPTER, has_lora, merge_lora

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# open_clip text-block module paths -> transformers CLIPTextModel ones (block index kept).
_TEXT_NAMES = (
    (re.compile(r"^resblocks\.(\d+)\.attn\.out_proj\."), r"text_model.encoder.layers.\1.self_attn.out_proj."),
    (re.compile(r"^resblocks\.(\d+)\.mlp\.c_fc\."), r"text_model.encoder.layers.\1.mlp.fc1."),
    (re.compile(r"^resblocks\.(\d+)\.mlp\.c_proj\."), r"text_model.encoder.layers.\1.mlp.fc2."),
)
_TEXT_TARGETS = {"out_proj": "out_proj", "c_fc": "fc1", "c_proj": "fc2"}


def _text_key(key: str) -> str:
    """An open_clip text-block adapter key in transformers naming (a one-line error for any other)."""
    for pattern, replacement in _TEXT_NAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    raise UsageError(f"text-encoder adapter '{key}' has no transformers CLIPTextModel name; only out_proj, "
                     "c_fc and c_proj adapters can be exported for diffusers.")


def _metadata(lora: Any, targets: List[str]) -> Dict[str, Any]:
    """The peft ``LoraConfig`` fields diffusers rebuilds the adapter from."""
    rank = int(lora.rank)
    return {"r": rank, "lora_alpha": float(lora.alpha if lora.alpha is not None else rank),
            "target_modules": list(targets), "lora_dropout": float(lora.dropout), "init_lora_weights": True}


def _plain(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}


def lora_layers_for_diffusers(system: Any) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{"unet": {...}, "text_encoder": {...}}``: the adapters in diffusers' naming, without prefixes
    (the text encoder's only when it has adapters)."""
    unet = convert_state_dict_to_diffusers(get_peft_model_state_dict(system.unet, adapter_name=ADAPTER))
    layers = {"unet": _plain(unet)}
    blocks = system.clip._text.transformer
    if has_lora(blocks):
        peft_state = get_peft_model_state_dict(blocks, adapter_name=ADAPTER)
        layers["text_encoder"] = _plain(convert_state_dict_to_diffusers({_text_key(k): v for k, v in peft_state.items()}))
    return layers


def export_lora(system: Any, out: str | Path) -> Path:
    """Write ``OUT/pytorch_lora_weights.safetensors`` (see the module docstring); returns its path."""
    lora = getattr(system, "lora", None)
    if lora is None:
        raise UsageError("--lora exports LoRA adapters, and this checkpoint was trained without them "
                         "(model.lora.rank 0); export it without --lora.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"LoRA export folder '{out}' exists and is not empty; pass a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    layers = lora_layers_for_diffusers(system.to("cpu").float())
    text = layers.get("text_encoder")
    text_targets = [_TEXT_TARGETS.get(t, t) for t in lora.text_encoder_targets]
    with AtomicFile(out / WEIGHT_NAME) as f:  # diffusers writes the file; ours lands only when complete
        tmp = Path(f.name)
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp.parent, unet_lora_layers=layers["unet"], text_encoder_lora_layers=text, weight_name=tmp.name,
            safe_serialization=True, unet_lora_adapter_metadata=_metadata(lora, list(lora.unet_targets)),
            text_encoder_lora_adapter_metadata=_metadata(lora, text_targets) if text else None)
    log.info("wrote %d U-Net%s adapter tensors to %s", len(layers["unet"]),
             f" and {len(text)} text-encoder" if text else "", out / WEIGHT_NAME)
    return out / WEIGHT_NAME


def merged_copy(system: Any) -> Any:
    """``system`` itself without adapters; else a copy whose U-Net (and text tower) have them merged."""
    if getattr(system, "lora", None) is None:
        return system
    merged = copy.deepcopy(system)
    merged.unet = merge_lora(merged.unet)
    text = merged.clip._text
    if has_lora(text.transformer):
        text.transformer = merge_lora(text.transformer)
    merged.lora = None
    return merged


__all__ = ["WEIGHT_NAME", "export_lora", "lora_layers_for_diffusers", "merged_copy"]
