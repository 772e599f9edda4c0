"""Low-rank adapters (LoRA, via peft) on a diffusers U-Net and on an open_clip text tower.

:func:`add_unet_lora` uses diffusers' own ``unet.add_adapter`` (the layout diffusers' LoRA
training scripts and ``load_lora_weights`` use); :func:`add_text_lora` injects the same peft
layers into an open_clip text transformer. Both freeze the base weights. open_clip's attention is a
fused ``nn.MultiheadAttention``, whose forward reads ``out_proj.weight`` directly and never calls
``out_proj`` — an adapter there would be silently ignored (peft says so too) — so a targeted
attention gets :class:`OutProjCallingAttention`, the same computation calling ``out_proj`` as a
module. Its fused in-projection (q, k, v) is a bare parameter, not a module, and cannot be a target.

Helpers: :func:`lora_state_dict`, :func:`set_lora_scale` (a context manager; 0 = the base model's
output exactly), :func:`merge_lora` (a copy with the adapters folded into the base weights) and
:func:`parameter_counts`. The adapter name is always :data:`ADAPTER`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mmdiff.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER = "default"  # diffusers' and peft's default adapter name
LORA_MARK = ".lora_"  # in every adapter weight's name (lora_A / lora_B), in no base weight's


def _peft_config(rank: int, alpha: Optional[float], dropout: float, targets: Sequence[str],
                 init: str) -> LoraConfig:
    return LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                      lora_dropout=float(dropout), target_modules=list(targets),
                      init_lora_weights="gaussian" if init == "gaussian" else True)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a plain target name: the module's full name is it, or ends in ``.target``."""
    return name == target or name.endswith(f".{target}")


def check_targets(module: nn.Module, targets: Sequence[str], what: str) -> None:
    """Raise a one-line :class:`ConfigError` naming ``what`` when a target matches no module."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]
    for target in targets:
        if not any(_matches(n, target) for n in names):
            suffixes = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                               for n in names})
            raise ConfigError(f"{what} '{target}' matches no linear layer; those that exist: {', '.join(suffixes)}.")


def add_unet_lora(unet: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
                  targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"), init: str = "gaussian") -> None:
    """Freeze ``unet`` (a diffusers ``UNet2DConditionModel``) and add trainable adapters to ``targets``."""
    check_targets(unet, targets, "model.lora.unet_targets")
    unet.requires_grad_(False)
    unet.add_adapter(_peft_config(rank, alpha, dropout, targets, init), adapter_name=ADAPTER)


class OutProjCallingAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (self-attention, fused in-projection, no weights returned) whose
    output projection runs as a module call, so an adapter on ``out_proj`` takes part.

    Set on an existing module by class assignment (parameters and state-dict keys unchanged).
    While every ``out_proj`` adapter has scale 0 the stock forward runs, so the output is the base
    model's bit for bit.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, None]:
        if _scales_all_zero(self.out_proj):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if need_weights or key_padding_mask is not None or self.bias_k is not None or self.add_zero_attn \
                or not self._qkv_same_embed_dim:
            raise NotImplementedError("OutProjCallingAttention handles open_clip's text attention only "
                                      "(fused projection, no key padding mask, no attention weights).")
        x_q, x_k, x_v = (t if self.batch_first else t.transpose(0, 1) for t in (query, key, value))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        batch, length, width = x_q.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, width // heads).transpose(1, 2)

        q, k, v = split(F.linear(x_q, w_q, b_q)), split(F.linear(x_k, w_k, b_k)), split(F.linear(x_v, w_v, b_v))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=is_causal and attn_mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _scales_all_zero(module: nn.Module) -> bool:
    return isinstance(module, BaseTunerLayer) and all(s == 0 for s in module.scaling.values())


def add_text_lora(text: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
                  targets: Sequence[str] = ("out_proj", "c_fc", "c_proj"), init: str = "gaussian") -> None:
    """Freeze an open_clip text transformer (its ``transformer.resblocks``) and add adapters to ``targets``."""
    blocks = text.transformer
    check_targets(blocks, targets, "model.lora.text_encoder_targets")
    text.requires_grad_(False)
    if any(_matches("attn.out_proj", t) for t in targets):
        for module in blocks.modules():
            if type(module) is nn.MultiheadAttention:
                module.__class__ = OutProjCallingAttention
    # Only the text transformer's blocks (not a vision tower beside it in the same CLIP).
    inject_adapter_in_model(_peft_config(rank, alpha, dropout, targets, init), blocks, adapter_name=ADAPTER)


def lora_layers(module: nn.Module) -> Iterator[Tuple[str, BaseTunerLayer]]:
    """(name, layer) of every peft adapter layer inside ``module``."""
    for name, child in module.named_modules():
        if isinstance(child, BaseTunerLayer):
            yield name, child


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds any adapter layer."""
    return next(lora_layers(module), None) is not None


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key names an adapter weight."""
    return LORA_MARK in key


def lora_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights of ``module`` by their state-dict names (peft's, adapter name included)."""
    return {k: v for k, v in module.state_dict().items() if is_lora_key(k)}


def lora_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The adapter parameters of ``module`` (what trains)."""
    return [p for n, p in module.named_parameters() if is_lora_key(f".{n}")]


@contextlib.contextmanager
def set_lora_scale(module: nn.Module, scale: float) -> Iterator[None]:
    """Multiply every adapter's output by ``scale`` inside the block (0: the base model exactly)."""
    layers = [layer for _, layer in lora_layers(module)]
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.scaling[name] = layer.scaling[name] * float(scale)
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


def merge_lora(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every adapter folded into its base weight and the peft layers removed
    (state-dict keys as before adapters were added)."""
    merged = copy.deepcopy(module)
    for name, layer in list(lora_layers(merged)):
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, layer.get_base_layer())
    for sub in merged.modules():
        if type(sub) is OutProjCallingAttention:
            sub.__class__ = nn.MultiheadAttention
    if hasattr(merged, "peft_config"):  # diffusers' ModelMixin remembers its adapters
        del merged.peft_config
        merged._hf_peft_config_loaded = False
    return merged


def parameter_counts(module: nn.Module) -> Dict[str, int]:
    """``{"adapter": n, "base": n}``: adapter parameters and all others (works on the meta device)."""
    adapter = sum(p.numel() for n, p in module.named_parameters() if is_lora_key(f".{n}"))
    total = sum(p.numel() for p in module.parameters())
    return {"adapter": adapter, "base": total - adapter}


__all__ = ["ADAPTER", "OutProjCallingAttention", "add_text_lora", "add_unet_lora", "check_targets", "has_lora",
           "is_lora_key", "lora_layers", "lora_parameters", "lora_state_dict", "merge_lora", "parameter_counts",
           "set_lora_scale"]
