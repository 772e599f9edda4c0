"""Sampling speed: s/image and ms per U-Net call of ``system.sample``."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import torch
from omegaconf import DictConfig

from mmdiff.jobs.bench.timing import median, sync


class _CallTimer:
    """Times each forward call of a module (synchronising on CUDA)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.times: List[float] = []
        self._start = 0.0
        self._device = device

        def pre(mod, args, kwargs=None):
            sync(self._device)
            self._start = time.perf_counter()

        def post(mod, args, output):
            sync(self._device)
            self.times.append(time.perf_counter() - self._start)

        self._handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def bench_sampling(system: Any, cfg: DictConfig, device: torch.device, *,
                   batch_sizes: Sequence[int] = (1, 16), steps: int = 20,
                   sampler: str = "dpmpp_2m") -> Dict[str, Any]:
    """s/image and ms per U-Net call of ``system.sample`` (guidance from the config)."""
    system.eval()
    prompts = list(cfg.sampling.prompts) or ["a photo of something"]
    rows: Dict[str, Any] = {}
    for bs in batch_sizes:
        batch_prompts = [prompts[i % len(prompts)] for i in range(bs)]
        system.sample(batch_prompts, seed=0, sampler=sampler, steps=2)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = _CallTimer(system.unet, device)
        try:
            sync(device)
            start = time.perf_counter()
            system.sample(batch_prompts, seed=0, sampler=sampler, steps=steps)
            sync(device)
            total = time.perf_counter() - start
        finally:
            timer.close()
        row = {"batch_size": bs, "s_total": total, "s_per_image": total / bs,
               "unet_calls": len(timer.times), "ms_per_unet_call": 1000 * median(timer.times),
               "unet_share": sum(timer.times) / total}
        if device.type == "cuda":
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows[str(bs)] = row
    guidance = float(cfg.sampling.guidance_scale)
    return {"sampler": sampler, "steps": steps, "guidance_scale": guidance,
            "unet_batch": "2 × batch (guided and unguided in one call)" if guidance != 1.0 else "batch",
            "by_batch": rows}
