"""When a callback may synchronise: the host with the device, or the ranks with each other.

On a GPU every ``.item()``, ``bool(tensor)`` or all-reduce whose result the host reads stalls the
pipeline: the CPU waits until the device has finished everything queued so far. Callbacks that run
every batch therefore keep their counts on the device (or on the host, from host data) and
synchronise only on the batches Lightning writes metrics on (:func:`metrics_written_now`), plus the
last training batch. The decision depends only on step counters every rank shares, so a collective
taken on it is taken by every rank at the same batch.
"""
from __future__ import annotations

import lightning as L
import torch.distributed as dist


def metrics_written_now(trainer: L.Trainer) -> bool:
    """Whether this training batch is one whose logged values reach the loggers (every
    ``trainer.log_every_n_steps`` optimiser steps) or the last of the run; the same on every rank.

    Call it in ``on_train_batch_end`` (before Lightning advances its logging step counter).
    """
    every = trainer.log_every_n_steps
    # Lightning's own rule (LoggerConnector.should_update_logs) minus `should_stop`, which can be
    # set on one rank only (a requeue flag read later in the same hook chain).
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
    if every > 0 and step % every == 0:
        return True
    return trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps


def world_size() -> int:
    """Processes in the default process group; 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
