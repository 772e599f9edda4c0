"""Speed switches applied to a system's modules: TF32, and the U-Net's memory format, compilation
and gradient checkpointing."""
from __future__ import annotations

import logging
from typing import Any, Dict

import torch

log = logging.getLogger(__name__)


def enable_tf32(enabled: bool = True) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions (Ampere and newer; ignored elsewhere)."""
    mode = "tf32" if enabled else "ieee"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # pragma: no cover - older torch
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def prepare_unet(unet: torch.nn.Module, ucfg: Any, device: torch.device) -> Dict[str, Any]:
    """Apply ``model.unet``'s speed switches to a diffusers U-Net in place; return what was applied.

    * ``channels_last`` (null = on for CUDA): NHWC weights, so cuDNN picks its fastest convolutions;
    * ``gradient_checkpointing``: diffusers' per-block activation recomputation;
    * ``compile``: ``none``, ``full`` (``unet.compile()``) or ``regional`` (each down/mid/up block
      compiled on its own: smaller graphs, quicker to compile and less fragile than the whole
      U-Net). ``nn.Module.compile`` compiles in place, so state-dict keys do not change.
    """
    device = torch.device(device)
    applied: Dict[str, Any] = {}
    channels_last = ucfg.channels_last
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    applied["channels_last"] = bool(channels_last)
    if ucfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    applied["gradient_checkpointing"] = bool(ucfg.gradient_checkpointing)
    mode = ucfg.compile
    # Static shapes: a training run sees one or two batch shapes, and inductor's dynamic-shape
    # path failed on these blocks (torch 2.14, CPU).
    if mode == "full":
        unet.compile(dynamic=False)
    elif mode == "regional":
        blocks = list(unet.down_blocks) + list(unet.up_blocks)
        if unet.mid_block is not None:
            blocks.append(unet.mid_block)
        for block in blocks:
            block.compile(dynamic=False)
    applied["compile"] = mode
    log.info("U-Net speed switches: %s", applied)
    return applied
