"""SLURM requeue at a batch boundary: SIGUSR1 → all ranks save ``hpc_ckpt_N.ckpt`` after the
current training batch, training stops, and rank 0 flushes the loggers and requeues the job.

Lightning's own SLURM handler saves the checkpoint *inside the signal handler*, wherever the
training step happens to be: in the middle of a forward pass, or between the optimiser step and
the progress counters. Resuming from such a checkpoint re-runs a batch the weights may already
have learned from, and shifts the logged step numbers by one (a gap in the step sequence); the
collectives it runs inside the handler (checkpoint barrier, FSDP state-dict gathers) can meet a
different collective on another rank. Here the handler only sets a flag; at the end of every
training batch the ranks agree on it (one all-reduce of one integer), and then all of them save
at the same batch boundary, which resumes exactly (see :mod:`mmdiff.callbacks.data_position`).

No pipeline stall: the all-reduce is started without waiting (``async_op``) at the end of one
batch and its result read at the end of the next, by when the device has long finished it, so
the host never waits for the batch it has just queued. The checkpoint therefore comes one batch
after the signal (SLURM's ``--signal=SIGUSR1@90`` leaves minutes for that). A single process reads
the flag directly: no tensor, no sync.

``build_trainer`` turns Lightning's handler off (``SLURMEnvironment(auto_requeue=False)``) and adds
this callback when the run is SLURM-managed. It is a Lightning ``Checkpoint`` so the trainer runs it
after ``ModelCheckpoint`` (checkpoint callbacks go last, in list order): when the signal lands on a
periodic-checkpoint step, the requeue file is written after ``last.ckpt`` and holds the periodic
callback's updated state, and the rerun (which picks the newest file) resumes from it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import WandbLogger

from mmdiff.callbacks.sync_cadence import world_size

log = logging.getLogger(__name__)


class RequeueOnSignal(Checkpoint):
    """Save ``RUN_DIR/hpc_ckpt_N.ckpt`` at the next batch boundary after ``signum``, requeue, stop."""

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True) -> None:
        self.signum = signum
        self.requeue = requeue
        self.received = False
        self.saved: Optional[str] = None
        self._previous: Any = None
        self._flag: Optional[torch.Tensor] = None  # on the device, reused: filling it needs no copy
        self._work: Any = None  # the all-reduce started at the previous batch end, not yet read

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous)
            self._previous = None
        if self.saved is not None and self.requeue and trainer.is_global_zero:
            # Last thing before SLURM stops the job: flush what the loggers hold, then requeue.
            for logger in trainer.loggers:
                logger.finalize("success")
                if isinstance(logger, WandbLogger) and logger._experiment is not None:
                    logger.experiment.finish()
            self._requeue()

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True  # nothing else in a signal handler: the work happens at the batch end

    def _anyone_received(self, trainer: L.Trainer) -> bool:
        """Whether any rank had the signal by the end of the previous batch (this one's, alone)."""
        if world_size() <= 1:
            return self.received
        anyone = False
        if self._work is not None:  # started one batch ago: reading it does not stall the device
            self._work.wait()
            anyone = bool(self._flag.item())
        if self._flag is None:
            self._flag = torch.zeros(1, dtype=torch.int32, device=trainer.strategy.root_device)
        self._flag.fill_(1 if self.received else 0)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        return anyone

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._work is not None:  # every rank started it at the same batch: all finish it
            self._work.wait()
            self._work = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.saved is not None or not self._anyone_received(trainer):
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        if trainer.is_global_zero:
            log.info("requeue signal: saving %s after step %d", path, trainer.global_step)
        trainer.save_checkpoint(path)  # all ranks, at the same batch boundary (ends in a barrier)
        self.saved = path
        trainer.should_stop = True  # the requeue itself comes in teardown, once the fit has ended

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
        if not job:
            log.warning("requeue signal received outside a SLURM job; %s is saved, nothing requeued", self.saved)
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            log.info("requeued SLURM job %s; it resumes from %s", job, self.saved)
        else:
            log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
