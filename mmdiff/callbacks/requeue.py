"""Stop on a signal at an optimiser-step boundary: SIGUSR1 → save ``hpc_ckpt_N.ckpt``, requeue the
SLURM job and leave the fit at once; SIGTERM → save the same file and stop (``mmdiff fit`` exits 143).

Lightning's own SLURM handler saves the checkpoint *inside the signal handler*, wherever the
training step happens to be: in the middle of a forward pass, or between the optimiser step and
the progress counters. Resuming from such a checkpoint re-runs a batch the weights may already
have learned from, and shifts the logged step numbers by one (a gap in the step sequence); the
collectives it runs inside the handler (checkpoint barrier, FSDP state-dict gathers) can meet a
different collective on another rank. Here the handler only records the signal; at the end of
every training batch the ranks agree on it (one all-reduce of one integer), and then all of them
save at the same optimiser-step boundary — never inside a gradient-accumulation window, whose
partial gradients a checkpoint does not hold — which resumes exactly
(see :mod:`mmdiff.callbacks.data_position`).

No pipeline stall: the all-reduce is started without waiting (``async_op``) at the end of one
batch and its result read at the end of the next, by when the device has long finished it, so
the host never waits for the batch it has just queued. The checkpoint therefore comes one batch
(plus the rest of an accumulation window) after the signal. A single process reads the flag
directly: no tensor, no sync.

After the save the callback raises :class:`StopForSignal`, which ``mmdiff.run.training.fit``
catches: no end-of-fit validation, ``last.ckpt``, final previews or checkpoint upload run, so the
requeue lands well inside SLURM's ``--signal=SIGUSR1@90`` window and a SIGTERM'd job saves inside
SLURM's ``KillWait``. On SIGUSR1 rank 0 closes the W&B run (marked preempted; its offline files
complete) and then runs ``scontrol requeue``, which ends the job.

SIGTERM: Lightning's handler (set after the callbacks' ``setup``) would stop the fit at the end of
the current batch without a checkpoint; ``on_train_start`` replaces it by this callback's.

``build_trainer`` adds this callback (SIGUSR1 only under SLURM, where Lightning's handler is turned
off with ``SLURMEnvironment(auto_requeue=False)``; SIGTERM when ``trainer.sigterm_save``). It is a
Lightning ``Checkpoint`` so the trainer runs it after ``ModelCheckpoint`` (checkpoint callbacks go
last, in list order): when the signal lands on a periodic-checkpoint step, the requeue file is
written after ``last.ckpt`` and holds the periodic callback's updated state, and the rerun (which
picks the newest file) resumes from it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer import call

from mmdiff.callbacks.sync_cadence import world_size

log = logging.getLogger(__name__)

# What the ranks all-reduce (MAX): a SIGTERM outranks a requeue request, since the job is ending anyway.
_NONE, _REQUEUE, _TERMINATE = 0, 1, 2


class StopForSignal(Exception):
    """Raised on every rank once the signal's checkpoint is saved; ``fit`` ends the run on it."""

    def __init__(self, signum: int, step: int, path: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {path}")
        self.signum = signum
        self.step = step
        self.path = path


class RequeueOnSignal(Checkpoint):
    """Save ``RUN_DIR/hpc_ckpt_N.ckpt`` at the next optimiser-step boundary after a signal, then stop.

    ``requeue_signal`` (SIGUSR1; ``None`` = not handled) also requeues the SLURM job;
    ``sigterm_save`` makes SIGTERM save too (otherwise Lightning stops without a checkpoint).
    ``after_save(path)`` runs on global rank 0 once the new file is complete (e.g. to prune older ones).
    """

    def __init__(self, requeue_signal: Optional[int] = signal.SIGUSR1, sigterm_save: bool = True,
                 after_save: Optional[Callable[[str], Any]] = None) -> None:
        self.requeue_signal = requeue_signal
        self.sigterm_save = sigterm_save
        self.after_save = after_save
        self.received = _NONE
        self.received_at: Optional[float] = None  # time.monotonic() of the first signal
        self.saved: Optional[str] = None
        self._previous: Any = None
        self._flag: Optional[torch.Tensor] = None  # on the device, reused: filling it needs no copy
        self._work: Any = None  # the all-reduce started at the previous batch end, not yet read

    @property
    def sigterm_received(self) -> bool:
        """Whether this process got SIGTERM during the fit (saved or not)."""
        return self.received == _TERMINATE

    # ------------------------------------------------------------------------------ handlers
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.requeue_signal is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.requeue_signal, self._handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own SIGTERM handler is set (Trainer._run): this one replaces it, and
        # Lightning's signal teardown restores what was there before the fit.
        if self.sigterm_save and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.requeue_signal, self._previous)
            self._previous = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning runs no teardown hooks after an exception

    def _handler(self, signum: int, frame: Any) -> None:
        # Nothing else in a signal handler: the work happens at a batch end.
        code = _TERMINATE if signum == signal.SIGTERM else _REQUEUE
        if self.received_at is None:
            self.received_at = time.monotonic()
        self.received = max(self.received, code)

    # --------------------------------------------------------------------------- agreement
    def _agreed(self, trainer: L.Trainer) -> int:
        """The strongest signal any rank had by the end of the previous batch (this one's, alone)."""
        if world_size() <= 1:
            return self.received
        agreed = _NONE
        if self._work is not None:  # started one batch ago: reading it does not stall the device
            self._work.wait()
            agreed = int(self._flag.item())
        if self._flag is None:
            self._flag = torch.zeros(1, dtype=torch.int32, device=trainer.strategy.root_device)
        self._flag.fill_(self.received)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        return agreed

    def _drain(self) -> None:
        if self._work is not None:  # every rank started it at the same batch: all finish it
            self._work.wait()
            self._work = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drain()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.saved is not None:
            return
        agreed = self._agreed(trainer)
        if agreed == _NONE or trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid accumulation window: its partial gradients are in no checkpoint
        self._drain()
        # The stop below cuts the batch short: finish it first as Lightning would, with the
        # module's own batch-end hook (it may change weights, e.g. clamp a parameter) and handing
        # this step's metrics to the loggers, so the checkpoint and the logs hold the whole step.
        call._call_lightning_module_hook(trainer, "on_train_batch_end", outputs, batch, batch_idx)
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # all ranks, at the same step boundary (ends in a barrier)
        self.saved = path
        signum = signal.SIGTERM if agreed == _TERMINATE else self.requeue_signal
        if trainer.is_global_zero:
            if self.after_save is not None:  # the file is complete: AtomicCheckpointIO renames it into place
                self.after_save(path)
            if agreed == _REQUEUE:
                self._close_wandb(trainer)
                self._requeue(trainer.global_step)
        raise StopForSignal(signum, trainer.global_step, path)

    # ----------------------------------------------------------------------------- requeue
    def _since_signal(self) -> str:
        if self.received_at is None:
            return "after another rank's signal"
        return f"{time.monotonic() - self.received_at:.1f} s after {signal.Signals(self.requeue_signal).name}"

    @staticmethod
    def _close_wandb(trainer: L.Trainer) -> None:
        """Finish the W&B run, marked preempted, before the requeue ends the job (no checkpoint upload)."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                started = time.monotonic()
                logger.experiment.mark_preempting()
                logger.experiment.finish(exit_code=0)
                log.info("requeue: W&B run closed in %.1f s", time.monotonic() - started)

    def _requeue(self, step: int) -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
        if not job:
            log.warning("requeue signal received outside a SLURM job; %s is saved, nothing requeued", self.saved)
            return
        when = self._since_signal()
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            log.info("requeue: saved step %d and requeued job %s %s; it resumes from %s", step, job, when, self.saved)
        else:
            log.warning("scontrol requeue %s failed (%s); step %d is saved in %s", job, result.stderr.strip(),
                        step, self.saved)
