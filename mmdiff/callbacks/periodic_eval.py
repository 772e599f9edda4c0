"""In-training image metrics: every ``eval.every_n_steps`` steps, FID and/or CLIP score on N images.

Off by default (``eval.every_n_steps: 0``). Generates ``eval.n_images`` images with the EMA weights
(when an EMA callback is present) from ``eval.prompts`` — or the reference images' captions — and
logs ``eval/fid_<extractor>``, ``eval/kid_<extractor>`` and ``eval/clipscore`` on rank 0 (under FSDP
every rank samples, since the sharded U-Net's forward needs them all). Reference
images (``eval.reference_shards``, else ``data.val_shards``) are read once, on first use.
The system must offer ``sample(prompts, seed=, steps=)``, ``encode_prompts`` and a ``clip`` encoder.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional

import lightning as L
import torch

from mmdiff.callbacks.ema import find_ema
from mmdiff.data.reference import read_reference
from mmdiff.eval.features import build_extractor
from mmdiff.eval.generative import cycle_prompts, generate_images, score_images
from mmdiff.callbacks.sharding import has_sharded_parameters

log = logging.getLogger(__name__)


class ImageEvalCallback(L.Callback):
    """Runs :func:`mmdiff.eval.generative.score_images` on fresh samples every K steps."""

    def __init__(self, eval_cfg: Any, reference_shards: List[str], image_size: int, clip_name: str) -> None:
        self.cfg = eval_cfg
        self.reference_shards = list(eval_cfg.reference_shards) or list(reference_shards)
        self.image_size = image_size
        self.clip_name = clip_name
        self.metrics = list(eval_cfg.metrics)
        self._reference: Optional[torch.Tensor] = None
        self._captions: List[str] = []
        self._extractor: Optional[torch.nn.Module] = None
        self._last = -1

    def _setup(self, pl_module: L.LightningModule) -> None:
        if self._reference is not None or not self.reference_shards:
            return

        self._reference, self._captions = read_reference(self.reference_shards, self.image_size, self.cfg.n_images)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.cfg.every_n_steps <= 0 or step % self.cfg.every_n_steps or step == self._last:
            return
        self._last = step
        if not trainer.is_global_zero and not has_sharded_parameters(pl_module):
            return  # a replicated model: rank 0 samples alone; a sharded one needs every rank
        result = self.evaluate(pl_module, find_ema(trainer))
        if not trainer.is_global_zero:
            return
        numbers = {f"eval/{k}": float(v) for k, v in result.items() if isinstance(v, float)}
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=step)
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in numbers.items()))

    @torch.no_grad()
    def evaluate(self, pl_module: L.LightningModule, ema: Any = None) -> dict:
        """Sample and score now (with EMA weights when ``ema`` is given)."""
        self._setup(pl_module)
        needs_reference = bool({"fid", "kid"} & set(self.metrics))
        if needs_reference and self._reference is None:
            raise ValueError("eval.metrics asks for FID/KID but no reference shards are configured "
                             "(eval.reference_shards or data.val_shards).")
        if needs_reference and self._extractor is None:
            self._extractor = build_extractor(self.cfg.extractor, inception_weights=self.cfg.inception_weights,
                                              clip=pl_module.clip, clip_name=self.clip_name).to(pl_module.device)
        prompts = cycle_prompts(list(self.cfg.prompts) or self._captions, self.cfg.n_images)
        was_training = pl_module.training
        pl_module.eval()
        try:
            def sample(p: List[str], seed: int) -> torch.Tensor:
                return pl_module.sample(p, seed=seed, steps=int(self.cfg.steps))

            if ema is not None:
                with ema.applied(pl_module):
                    images = generate_images(sample, prompts, self.cfg.batch_size, self.cfg.seed)
            else:
                images = generate_images(sample, prompts, self.cfg.batch_size, self.cfg.seed)
            return score_images(
                images, prompts, self.metrics, reference=self._reference, extractor=self._extractor,
                encode_image=lambda x: pl_module.clip.encode_image(x)[0],
                encode_text=lambda p: pl_module.encode_prompts(p)["pooled"], clip_model=self.clip_name,
                batch_size=self.cfg.batch_size, kid_subsets=10,
            )
        finally:
            pl_module.train(was_training)


__all__ = ["ImageEvalCallback"]
