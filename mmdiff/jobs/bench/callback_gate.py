"""Turn a group of callbacks on and off per training batch inside one ``Trainer.fit``.

:class:`CallbackGate` holds callbacks and forwards Lightning's hooks to them: the hooks of a
training batch (:data:`PER_BATCH_HOOKS`) only for the batches its ``schedule`` turns on, every other
hook (setup, fit/train start and end, teardown, exceptions, ...) always, so the callbacks are set up
and torn down exactly once. The schedule is a function of the batch's index in the fit alone: run
on every rank with the same schedule, the gated callbacks take their collectives at the same
batches on all ranks.

The gate is for timing runs without checkpoints: it keeps no state of its own in a checkpoint
and does not save or restore the gated callbacks' states.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence

import lightning as L

#: The hooks Lightning calls once per training batch (or per optimiser step inside one).
PER_BATCH_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward",
                   "on_before_zero_grad", "on_before_optimizer_step", "on_train_batch_end")

#: The hooks forwarded whatever the schedule: each runs once per fit, epoch or validation pass.
ALWAYS_HOOKS = ("setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
                "on_train_epoch_start", "on_train_epoch_end", "on_sanity_check_start",
                "on_sanity_check_end", "on_validation_start", "on_validation_end",
                "on_validation_epoch_start", "on_validation_epoch_end", "on_validation_batch_start",
                "on_validation_batch_end", "on_exception")


def _forwarder(name: str, gated: bool) -> Callable[..., None]:
    def hook(self: "CallbackGate", *args: Any, **kwargs: Any) -> None:
        if gated and not self.on:
            return
        for callback in self.callbacks:
            getattr(callback, name)(*args, **kwargs)

    hook.__name__ = name
    hook.__doc__ = f"``{name}`` of every gated callback" + (" (in batches the schedule turns on)." if gated else ".")
    return hook


class CallbackGate(L.Callback):
    """Forwards hooks to ``callbacks``; per-batch hooks only where ``schedule(batch)`` is true.

    ``batch`` counts the training batches of this fit from 0. :attr:`ran` records, per batch, whether
    the callbacks were on.
    """

    def __init__(self, callbacks: Sequence[L.Callback], schedule: Callable[[int], bool]) -> None:
        self.callbacks: List[L.Callback] = list(callbacks)
        self.schedule = schedule
        self.on = True
        self.ran: List[bool] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.on = bool(self.schedule(len(self.ran)))
        self.ran.append(self.on)
        if self.on:
            for callback in self.callbacks:
                callback.on_train_batch_start(trainer, pl_module, batch, batch_idx)


for _name in PER_BATCH_HOOKS[1:]:
    setattr(CallbackGate, _name, _forwarder(_name, gated=True))
for _name in ALWAYS_HOOKS:
    setattr(CallbackGate, _name, _forwarder(_name, gated=False))
del _name


def interleaved_schedule(warmup: int, order: Sequence[tuple[str, int]]) -> Callable[[int], bool]:
    """On for the first ``warmup`` batches, then per batch of ``order`` (from
    :func:`~mmdiff.jobs.bench.steps.interleave_order`): on for side ``"a"``, off for ``"b"``;
    on after the order ends."""
    sides = [side == "a" for side, _ in order]

    def schedule(batch: int) -> bool:
        i = batch - warmup
        return i < 0 or i >= len(sides) or sides[i]

    return schedule
