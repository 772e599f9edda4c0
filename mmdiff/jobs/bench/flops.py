"""FLOP counting (torch's flop counter, plus the CPU attention kernels it leaves out) and MFU."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig
from torch.utils import flop_counter as fc

from mmdiff.jobs.bench.batches import make_batch, precision_context


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order against the device name.
PEAK_BF16_TFLOPS: List[tuple[str, float]] = [
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]


def peak_bf16_tflops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak (TFLOP/s) from :data:`PEAK_BF16_TFLOPS`; None on CPU/unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def _flop_mapping() -> Dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention kernels, which torch's counter leaves out."""

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping: Dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of ``fn()`` (matmuls, convolutions and attention) by torch's flop counter."""
    with fc.FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def bench_flops(system: Any, cfg: DictConfig, device: torch.device) -> Dict[str, Any]:
    """FLOPs per image: U-Net training step (fwd + bwd), one U-Net call, frozen encoders."""
    bs = min(int(cfg.data.batch_size), 8)
    batch = make_batch(cfg, bs)
    system.precomputed = False
    images = batch["image"].to(device)
    latents = system.encode_images(images, sample=False)
    cond = system.encode_prompts(batch["caption"])
    t = torch.randint(0, system.diffusion.num_timesteps, (bs,), device=device)
    system.unet.train()

    def train_step() -> None:
        with precision_context(str(cfg.trainer.precision), device):
            out = system.denoise(latents, t, cond)
        out.float().square().mean().backward()

    def forward() -> None:
        with torch.no_grad():
            system.denoise(latents[:1], t[:1], {k: v[:1] for k, v in cond.items()})

    train = count_flops(train_step) / bs
    system.unet.zero_grad(set_to_none=True)
    call = count_flops(forward)
    vae = count_flops(lambda: system.encode_images(images)) / bs
    text = count_flops(lambda: system.encode_prompts(batch["caption"])) / bs
    system.precomputed = bool(cfg.model.precomputed)
    return {"unet_train_per_image": train, "unet_forward_per_image": call,
            "vae_encode_per_image": vae, "text_encode_per_image": text,
            "online_train_per_image": train + vae + text}


def add_achieved(flops: Dict[str, Any], train: Dict[str, Any], peak: Optional[float]) -> None:
    """Add achieved TFLOP/s of the framework steps and, with a known bf16 ``peak``, MFU to ``flops``."""
    achieved = {
        "online": flops["online_train_per_image"] * train["online"]["framework"]["images_per_s"],
        "precomputed": flops["unet_train_per_image"] * train["precomputed"]["framework"]["images_per_s"],
    }
    flops["achieved_tflops"] = {k: v / 1e12 for k, v in achieved.items()}
    flops["peak_bf16_tflops"] = peak
    flops["mfu"] = {k: v / (peak * 1e12) for k, v in achieved.items()} if peak else None
