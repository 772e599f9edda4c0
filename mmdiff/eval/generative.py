"""Score generated images: FID/KID against reference images, CLIP score against their prompts.

Works on callables (``sample(prompts, seed) -> images in [-1, 1]``) and tensors, never on a
system: the CLI and the training callback build the callables (DESIGN: eval never imports a system).
Metric keys name the extractor: ``fid_<extractor>``, ``kid_<extractor>`` (+ ``_std``),
``clipscore`` (with ``clip_model`` naming the CLIP that scored it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mmdiff.eval.clip_score import clip_score
from mmdiff.eval.fid import frechet_distance, kernel_distance
from mmdiff.io.atomic import write_text_atomic

log = logging.getLogger(__name__)

METRICS = ("fid", "kid", "clipscore")
SampleFn = Callable[[List[str], int], Tensor]


def cycle_prompts(prompts: Sequence[str], n: int) -> List[str]:
    """``n`` prompts, repeating the list in order."""
    if not prompts:
        raise ValueError("at least one prompt is needed to generate images.")
    return [prompts[i % len(prompts)] for i in range(n)]


def warn_cut_prompts(system: Any, prompts: List[str]) -> List[int]:
    """Log a warning naming the prompts the text encoder's context cuts off; return their indices."""
    clip = getattr(system, "clip", None)
    if clip is None or not prompts:
        return []
    cut = clip.prompts_cut_off(prompts)
    if cut:
        first = prompts[cut[0]]
        log.warning("%d of %d prompt(s) are longer than the text encoder's %d-token context and are cut off "
                    "(prompt %d: '%s…')", len(cut), len(prompts), clip.context_length, cut[0] + 1, first[:60])
    return cut


def generate(system: Any, prompts: List[str], n_per_prompt: int, batch_size: int, seed: int, **options: Any) -> torch.Tensor:
    """``n_per_prompt`` images for each prompt, prompt-major, in batches of ``system.sample(prompts, seed=…)``
    (any object with that method); batch ``i`` seeded ``seed + i``."""
    warn_cut_prompts(system, prompts)
    expanded = [p for p in prompts for _ in range(n_per_prompt)]
    chunks = [expanded[i : i + batch_size] for i in range(0, len(expanded), batch_size)]
    images = [
        system.sample(chunk, seed=seed + index, **options).cpu()
        for index, chunk in enumerate(tqdm(chunks, desc="sampling", unit="batch", disable=len(chunks) < 2))
    ]
    return torch.cat(images)


def generate_images(sample: SampleFn, prompts: Sequence[str], batch_size: int, seed: int) -> Tensor:
    """Images for ``prompts`` in order, ``batch_size`` at a time, batch ``i`` seeded ``seed + i``."""
    chunks = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    return torch.cat([sample(chunk, seed + i).float().cpu() for i, chunk in enumerate(chunks)])


def score_images(
    images: Tensor,
    prompts: Sequence[str],
    metrics: Sequence[str],
    *,
    reference: Optional[Tensor] = None,
    extractor: Optional[nn.Module] = None,
    encode_image: Optional[Callable[[Tensor], Tensor]] = None,
    encode_text: Optional[Callable[[List[str]], Tensor]] = None,
    clip_model: Optional[str] = None,
    batch_size: int = 64,
    kid_subsets: int = 100,
) -> Dict[str, Any]:
    """The requested metrics of ``images`` (one prompt each) as a flat dict."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}.")
    out: Dict[str, Any] = {"n_images": int(images.shape[0])}
    if {"fid", "kid"} & set(metrics):
        if reference is None or extractor is None:
            raise ValueError("FID/KID need reference images and a feature extractor.")
        name = str(getattr(extractor, "name", type(extractor).__name__))
        out.update(extractor=name, n_reference=int(reference.shape[0]))
        if "fid" in metrics:
            out[f"fid_{name}"] = frechet_distance(reference, images, extractor, batch_size)
        if "kid" in metrics:
            mean, std = kernel_distance(reference, images, extractor, batch_size, subsets=kid_subsets)
            out[f"kid_{name}"], out[f"kid_{name}_std"] = mean, std
    if "clipscore" in metrics:
        if encode_image is None or encode_text is None:
            raise ValueError("the CLIP score needs image and text encoders.")
        out["clipscore"] = clip_score(images, prompts, encode_image, encode_text, batch_size)
        out["clip_model"] = clip_model
    return out


def write_json(result: Dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as indented JSON (creating the folder); returns the path."""
    return write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")


__all__ = ["METRICS", "cycle_prompts", "generate", "generate_images", "score_images", "warn_cut_prompts",
           "write_json"]
