"""Plain-text progress for runs without a progress bar (batch jobs, SLURM logs, CI)."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import lightning as L

log = logging.getLogger("mmdiff.progress")


class ProgressLogCallback(L.Callback):
    """Every ``every_n_steps`` optimiser steps, log step/max, train loss, steps/s and ETA (rank 0)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self._start: Optional[float] = None
        self._start_step = 0
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._start_step = trainer.global_step
        # No line for the start step: a batch that opens an accumulation window (the first one of
        # a run, or of a resume) ends at that step, with nothing trained yet, at "0.00 steps/s".
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps or not trainer.is_global_zero:
            return
        self._last_step = step
        elapsed = time.monotonic() - (self._start or time.monotonic())
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        remaining = (trainer.max_steps - step) / rate if rate > 0 and trainer.max_steps > 0 else 0.0
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"{float(loss):.4f}" if loss is not None else "n/a"
        log.info(
            "step %d/%d  loss %s  %.2f steps/s  eta %dm%02ds",
            step, trainer.max_steps, loss_text, rate, remaining // 60, remaining % 60,
        )
