"""The ``eval:`` section: image metrics (FID, KID, CLIP score) on demand and during training."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from mmdiff.config.fields import choice, require


class EvalExtractor(str, enum.Enum):
    clip = "clip"  # the model's open_clip image tower (fallback; metric keys carry its fingerprint)
    inception = "inception"  # the standard FID Inception v3, weights from eval.inception_weights


@dataclass
class EvalConfig:
    """Image metrics: ``mmdiff eval fid|kid|clipscore`` and the in-training evaluation callback."""

    extractor: str = choice(EvalExtractor.clip)
    # Local file of the FID Inception weights (torch-fidelity's pt_inception-2015-12-05); nothing
    # is downloaded at run time.
    inception_weights: Optional[str] = None
    # In-training evaluation every K optimiser steps (0 = off): N images, FID + CLIP score.
    every_n_steps: int = 0
    n_images: int = 64
    metrics: List[str] = field(default_factory=lambda: ["fid", "clipscore"])
    # Prompts for the generated images; empty = the captions of the reference images.
    prompts: List[str] = field(default_factory=list)
    # Reference images for FID/KID; empty = data.val_shards.
    reference_shards: List[str] = field(default_factory=list)
    # Sampler steps for the in-training evaluation (sampler and guidance come from sampling:).
    steps: int = 20
    batch_size: int = 32
    seed: int = 0

    @staticmethod
    def check(e: DictConfig, cfg: DictConfig) -> None:
        require(e.every_n_steps >= 0, f"eval.every_n_steps must be >= 0 (0 = off), got {e.every_n_steps}.")
        require(e.n_images >= 2, f"eval.n_images must be at least 2 (FID needs two), got {e.n_images}.")
        require(e.steps > 0 and e.batch_size > 0, "eval.steps and eval.batch_size must be positive.")
        bad = [m for m in e.metrics if m not in ("fid", "kid", "clipscore")]
        require(not bad, f"eval.metrics {bad} are unknown; choose from fid, kid, clipscore.")
