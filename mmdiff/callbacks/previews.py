"""Log a system's preview images (samples, reconstructions) as PNG grids and W&B images.

The images come from the system's ``preview_images()`` (``dict[str, Tensor | (Tensor, nrow) |
(Tensor, nrow, captions)]``, images B×3×H×W in [-1, 1], ``captions`` one string per image; none by
default), part of the contract of
:class:`mmdiff.systems.base.System`, which this callback relies on without importing it (callbacks
sit below systems).
Previews run at step 0 and then every ``every_n_steps`` optimiser steps, with EMA weights when an
EMA callback is present. Only rank 0 writes them. With a replicated model only rank 0 samples
(no collectives, so other ranks simply continue to their next synchronisation point); with an
FSDP2-sharded model every rank runs the same sampling, since each forward all-gathers the shards.

In W&B each preview is the grid (``images/<name>``) and, when the images carry captions (the
prompts), one captioned image per caption holding that caption's images in a row
(``previews/<name>``) plus a Table of step, caption and image (``previews/<name>_table``), so a
prompt can be followed across steps.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from mmdiff.callbacks.ema import find_ema
from mmdiff.io.images import grid, save_png
from mmdiff.callbacks.sharding import has_sharded_parameters

log = logging.getLogger(__name__)


class ImageLoggingCallback(L.Callback):
    """Writes ``OUT_DIR/<name>_step0001000.png`` and logs ``images/<name>`` to W&B."""

    def __init__(self, out_dir: str | Path, every_n_steps: int = 500, nrow: int = 8) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.nrow = nrow
        self._last_logged = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_log(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._maybe_log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_log(trainer, pl_module)

    def _maybe_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_logged:
            return
        if not trainer.is_global_zero and not has_sharded_parameters(pl_module):
            return
        self._last_logged = step
        ema = find_ema(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                if ema is not None:
                    with ema.applied(pl_module):
                        previews = pl_module.preview_images()
                else:
                    previews = pl_module.preview_images()
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        for name, value in previews.items():
            images, nrow, captions = unpack_preview(value, self.nrow)
            picture = grid(images, nrow=nrow)
            path = save_png(picture, self.out_dir / f"{name}_step{step:07d}.png")
            log.info("wrote %s", path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"images/{name}", images=[picture], step=step)
                    if captions is not None:
                        log_captioned(logger, name, images, captions, step)


def unpack_preview(value: Any, default_nrow: int) -> Tuple[torch.Tensor, int, Optional[List[str]]]:
    """``(images, nrow, captions or None)`` from one ``preview_images()`` value."""
    if not isinstance(value, tuple):
        return value, default_nrow, None
    images, nrow, *rest = value
    captions = [str(c) for c in rest[0]] if rest and rest[0] is not None else None
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"a preview has {len(captions)} captions for {len(images)} images; give one per image.")
    return images, int(nrow), captions


def by_caption(images: torch.Tensor, captions: List[str]) -> Dict[str, torch.Tensor]:
    """The images of each distinct caption (in first-seen order), stacked."""
    groups: Dict[str, List[int]] = {}
    for i, caption in enumerate(captions):
        groups.setdefault(caption, []).append(i)
    return {caption: images[idx] for caption, idx in groups.items()}


def log_captioned(logger: WandbLogger, name: str, images: torch.Tensor, captions: List[str], step: int) -> None:
    """One captioned W&B image per caption (its images in a row) and a Table (step, caption, image)."""
    import wandb  # WandbLogger has imported it already

    per_caption = {caption: grid(group, nrow=len(group)) for caption, group in by_caption(images, captions).items()}
    logger.log_image(key=f"previews/{name}", images=list(per_caption.values()), caption=list(per_caption), step=step)
    rows = [[step, caption, wandb.Image(picture, caption=caption)] for caption, picture in per_caption.items()]
    logger.log_table(key=f"previews/{name}_table", columns=["step", "caption", "image"], data=rows, step=step)
