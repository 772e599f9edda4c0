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

log = logging.getLogger(__name__)


class RequeueOnSignal(Checkpoint):
    """Save ``RUN_DIR/hpc_ckpt_N.ckpt`` at the next batch boundary after ``signum``, requeue, stop."""

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True) -> None:
        self.signum = signum
        self.requeue = requeue
        self.received = False
        self.saved: Optional[str] = None
        self._previous: Any = None

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
        flag = torch.tensor([1 if self.received else 0], device=trainer.strategy.root_device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

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
