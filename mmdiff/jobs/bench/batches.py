"""The bench's inputs: the system, a fixed batch of the config's size, its precomputed form, and
the precision context the steps run under."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator

import torch
from omegaconf import DictConfig

from mmdiff.systems.speed import enable_tf32, prepare_unet
from mmdiff.systems.text_to_image import TextToImageSystem


def precision_context(precision: str, device: torch.device) -> Any:
    """Autocast for a Lightning precision name (bf16-*/16-*), else no context."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()

def bench_system(cfg: DictConfig, device: torch.device) -> Any:
    """The config's :class:`TextToImageSystem` on ``device`` with the config's speed switches,
    built for online encoding (stored arrays: :func:`use_stored_arrays`)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.precomputed = False
    system = TextToImageSystem(cfg)
    if float(system.latent_scale) == 0.0:
        system.latent_scale.fill_(1.0)  # estimated from data in real runs; irrelevant to timings
    system.to(device)
    if device.type == "cuda":
        enable_tf32(bool(cfg.trainer.tf32))
    system.speed = prepare_unet(system.unet, cfg.model.unet, device)
    return system


def make_batch(cfg: DictConfig, batch_size: int, seed: int = 0) -> Dict[str, Any]:
    """A fixed image/caption batch of the config's size (content does not change timings)."""
    g = torch.Generator().manual_seed(seed)
    size = int(cfg.data.image_size)
    images = (torch.randn(batch_size, 3, size, size, generator=g) * 0.5).clamp(-1, 1)
    prompts = list(cfg.sampling.prompts) or ["a photo of something"]
    captions = [prompts[i % len(prompts)] for i in range(batch_size)]
    return {"image": images, "caption": captions}


@torch.no_grad()
def precomputed_batch(system: Any, batch: Dict[str, Any]) -> Dict[str, Any]:
    """What `mmdiff precompute` would store for ``batch``: latent mean/logvar, context, pooled."""
    posterior = system.encode_posterior(batch["image"])
    cond = system.encode_prompts(batch["caption"])
    return {
        "latent": posterior.mean.float().cpu().half(),
        "latent_logvar": posterior.logvar.float().cpu().half(),
        "context": cond["context"].cpu().half(),
        "pooled": cond["pooled"].cpu().half(),
        "caption": list(batch["caption"]),
    }


def use_stored_arrays(system: Any) -> None:
    """Let ``system`` train on in-memory precomputed batches: no shards are read, so skip the
    precompute-folder check and use the text encoder's own empty-prompt states."""
    system._check_precomputed = lambda: None
    system._empty_states = system.encode_prompts([""])

class RepeatBatch(torch.utils.data.IterableDataset):
    """The same batch, ``n`` times."""

    def __init__(self, batch: Dict[str, Any], n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for _ in range(self.n):
            yield self.batch

    def __len__(self) -> int:
        return self.n


def pinned(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """``batch`` with its tensors in pinned memory when copying to a GPU."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
