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

Host syncs: the guard must know before ``optimizer.step`` whether to drop the gradients (the
promise is that a bad step changes no weight and no optimiser state, which an on-device
``torch.where`` cannot give: AdamW would still decay its moments, count the step and apply weight
decay). So it reads the device exactly once per optimiser step: the loss checks of all
micro-batches and the gradient check are folded into one flag on the device, all ranks' flags into
one all-reduce (MAX), and the host reads that one value. The skip count is logged only on the
steps Lightning writes metrics on.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from mmdiff.callbacks.sharding import local_shard
from mmdiff.callbacks.sync_cadence import metrics_written_now, world_size
from mmdiff.errors import TrainingError

log = logging.getLogger(__name__)


class NonFiniteTrainingError(TrainingError):
    """Training produced non-finite losses or gradients too many steps in a row."""


def grads_nonfinite(optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    """A 0-d bool tensor on the gradients' device, True when any gradient the optimiser would apply
    holds a NaN or an Inf; None without gradients. Nothing is read back to the host."""
    grads: List[torch.Tensor] = [
        local_shard(p.grad).detach() for group in optimizer.param_groups for p in group["params"]
        if p.grad is not None
    ]
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return None
    # max |g| per tensor: NaN propagates and, unlike a 2-norm, a large finite value cannot overflow.
    peaks = torch._foreach_norm(grads, math.inf)
    return ~torch.isfinite(torch.stack([p.float() for p in peaks])).all()


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """True when every gradient the optimiser would apply is free of NaN and Inf (reads the device)."""
    bad = grads_nonfinite(optimizer)
    return bad is None or not bool(bad)


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
        self._loss_bad: Optional[torch.Tensor] = None  # on the device: any micro-batch loss non-finite

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # stays on the device until the optimiser step
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        flags = [f for f in (self._loss_bad, None if scaler is not None else grads_nonfinite(optimizer))
                 if f is not None]
        self._loss_bad = None
        bad = self._any_rank_bad(flags, trainer.strategy.root_device)
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

    @staticmethod
    def _any_rank_bad(flags: List[torch.Tensor], device: torch.device) -> bool:
        """One flag from this rank's device flags, MAX over ranks, read once (the step's one sync)."""
        flag = torch.zeros((), dtype=torch.int32, device=device)
        for f in flags:
            flag = flag | f.to(device=device, dtype=torch.int32)
        if world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not metrics_written_now(trainer):
            return  # logging a number copies it to the device: only when it is written
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


__all__ = ["NaNGuard", "NonFiniteTrainingError", "grads_finite", "grads_nonfinite", "step_was_skipped"]
