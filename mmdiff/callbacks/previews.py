"""Log a system's preview images (samples, reconstructions) as PNG grids and W&B images.

The images come from the system's ``preview_images()`` (``dict[str, Tensor | (Tensor, nrow)]``,
images B×3×H×W in [-1, 1]; none by default), part of the contract of
:class:`mmdiff.systems.base.System`, which this callback relies on without importing it (callbacks
sit below systems).
Previews run at step 0 and then every ``every_n_steps`` optimiser steps, with EMA weights when an
EMA callback is present. Only rank 0 writes them. With a replicated model only rank 0 samples
(no collectives, so other ranks simply continue to their next synchronisation point); with an
FSDP2-sharded model every rank runs the same sampling, since each forward all-gathers the shards.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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
            images, nrow = value if isinstance(value, tuple) else (value, self.nrow)
            picture = grid(images, nrow=nrow)
            path = save_png(picture, self.out_dir / f"{name}_step{step:07d}.png")
            log.info("wrote %s", path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"images/{name}", images=[picture], step=step)
