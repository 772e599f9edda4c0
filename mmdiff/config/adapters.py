"""``model.lora``: low-rank adapters (LoRA) on a text_to_image model's U-Net (and text encoder).

With ``rank > 0`` the base weights are frozen and only the adapters train, are averaged by EMA and
are saved in checkpoints; the base weights are read again from where the config says they come
from (``model.pretrained``, ``model.init_from`` or ``model.unet.pretrained``), so one of those must
be set. Whether each target name matches a module is checked when the model is built (the names
that exist are listed then). See docs/lora.md.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from mmdiff.config.fields import choice, require


class LoRAInit(str, enum.Enum):
    """How the adapters start (B is zero either way, so the adapted model starts as the base)."""

    gaussian = "gaussian"  # A ~ N(0, 1/rank), as diffusers' LoRA training scripts do
    kaiming = "kaiming"  # peft's default: Kaiming-uniform A


@dataclass
class LoRAConfig:
    """Low-rank adapters (``system: text_to_image`` only; rank 0 = off)."""

    rank: int = 0
    # Scale alpha / rank on the adapters' output; null = rank (scale 1).
    alpha: Optional[float] = None
    dropout: float = 0.0
    # Module names (last name parts, as peft matches them) of the U-Net that get adapters.
    unet_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # Also adapt the open_clip text tower (it then takes gradients; its base weights stay frozen).
    text_encoder: bool = False
    # Module names in the open_clip text tower. Its attention is a fused nn.MultiheadAttention:
    # out_proj can be adapted, the fused in_proj (q, k, v) cannot.
    text_encoder_targets: List[str] = field(default_factory=lambda: ["out_proj", "c_fc", "c_proj"])
    init: str = choice(LoRAInit.gaussian)

    @staticmethod
    def check(c: DictConfig, cfg: DictConfig) -> None:
        require(c.rank >= 0, f"model.lora.rank must be >= 0 (0 = off), got {c.rank}.")
        if c.rank == 0:
            return
        require(cfg.system == "text_to_image",
                f"model.lora is only for the text_to_image system, not '{cfg.system}'; set model.lora.rank=0.")
        require(c.alpha is None or c.alpha > 0, f"model.lora.alpha must be positive or null (= rank), got {c.alpha}.")
        require(0.0 <= c.dropout < 1.0, f"model.lora.dropout must be in [0, 1), got {c.dropout}.")
        require(len(c.unet_targets) > 0, "model.lora.unet_targets must name at least one U-Net module.")
        require(not c.text_encoder or len(c.text_encoder_targets) > 0,
                "model.lora.text_encoder_targets must name at least one text-tower module.")
        require(not (c.text_encoder and "in_proj" in c.text_encoder_targets),
                "model.lora.text_encoder_targets cannot hold in_proj: open_clip's fused q/k/v projection is "
                "not a module; adapt out_proj, c_fc and c_proj.")
        m = cfg.model
        sources = [m.get("pretrained"), m.init_from, m.unet.pretrained]
        require(any(s is not None for s in sources),
                "model.lora needs base weights a checkpoint can find again: set model.pretrained, "
                "model.init_from or model.unet.pretrained.")
        require(not (c.text_encoder and m.clip.freeze is False),
                "model.lora.text_encoder adapts a frozen text encoder; leave model.clip.freeze true.")
