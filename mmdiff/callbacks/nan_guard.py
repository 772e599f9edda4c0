"""Skip optimiser steps whose loss or gradients are not finite; stop after too many in a row.

``trainer.nan_guard: true`` (default) adds :class:`NaNGuard`. Before each optimiser step it looks
at the loss of the step's micro-batches (``on_before_backward``) and at every gradient
(``on_before_optimizer_step``, before gradient clipping). When any of them holds a NaN or an Inf on
any rank, it sets every gradient to ``None``: ``torch.optim`` then leaves the parameters *and*
their state (AdamW moments and step counts) untouched, and :class:`~mmdiff.callbacks.ema.EMACallback`
skips its update for that step. The learning-rate schedule and ``global_step`` still advance, so a
skipped step counts towards ``trainer.max_steps``. The running total is logged as
``train/skipped_nonfinite`` and kept in checkpoints.

After ``trainer.max_bad_steps`` skipped steps in a row the run stops with
:class:`NonFiniteTrainingError` (exit code 1) naming the step and the last checkpoint written. No
checkpoint is written at the failing step, and the weights of every checkpoint are finite, because
a non-finite update was never applied.

With fp16 mixed precision the gradient scaler owns gradient overflow: an Inf/NaN gradient from a
too-large loss scale makes the scaler skip the step and lower the scale, which is normal, so under
a scaler only a non-finite *loss* counts as a bad step here.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from mmdiff.callbacks.sharding import local_shard
from mmdiff.errors import TrainingError

log = logging.getLogger(__name__)


class NonFiniteTrainingError(TrainingError):
    """Training produced non-finite losses or gradients too many steps in a row."""


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """True when every gradient the optimiser would apply is free of NaN and Inf."""
    grads: List[torch.Tensor] = [
        local_shard(p.grad).detach() for group in optimizer.param_groups for p in group["params"]
        if p.grad is not None
    ]
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return True
    # max |g| per tensor: NaN propagates and, unlike a 2-norm, a large finite value cannot overflow.
    peaks = torch._foreach_norm(grads, math.inf)
    return bool(torch.isfinite(torch.stack([p.float() for p in peaks])).all())


def step_was_skipped(trainer: L.Trainer) -> bool:
    """Whether a :class:`NaNGuard` skipped the optimiser step that just ran."""
    return any(isinstance(cb, NaNGuard) and cb.skipped_last_step for cb in trainer.callbacks)  # type: ignore[attr-defined]


class NaNGuard(Callback):
    """Skip and count non-finite steps; raise after ``max_bad_steps`` in a row (module docstring)."""

    def __init__(self, max_bad_steps: int = 5) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.skipped = 0  # all skipped steps of the run (checkpointed)
        self.consecutive = 0
        self.skipped_last_step = False
        self._loss_bad = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._loss_bad = True

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad = self._loss_bad or (scaler is None and not grads_finite(optimizer))
        self._loss_bad = False
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        self.skipped_last_step = bad
        if not bad:
            self.consecutive = 0
            return
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # A fused optimiser is unscaled inside scaler.step, which then finds no gradient to
            # check and fails scaler.update ("No inf checks were recorded"): check them now.
            scaler.unscale_(optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimisers skip parameters without a gradient: no update, no state change
        self.skipped += 1
        self.consecutive += 1
        step = trainer.global_step
        log.warning(
            "step %d: non-finite loss or gradient, optimiser step skipped (%d in a row, %d in all)",
            step, self.consecutive, self.skipped,
        )
        if self.consecutive >= self.max_bad_steps:
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {self.consecutive} steps in a row had a non-finite "
                f"loss or gradient (trainer.max_bad_steps={self.max_bad_steps}); the last good "
                f"checkpoint is {_last_checkpoint(trainer)}. Lower optim.lr, check the data, or "
                "resume from it with --resume."
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def _last_checkpoint(trainer: L.Trainer) -> str:
    """The newest checkpoint this run wrote, quoted; or a phrase saying there is none."""
    paths = [
        getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        for cb in trainer.checkpoint_callbacks
    ]
    paths = [p for p in paths if p]
    return f"'{paths[0]}'" if paths else "none (no checkpoint was written yet)"


__all__ = ["NaNGuard", "NonFiniteTrainingError", "grads_finite", "step_was_skipped"]
