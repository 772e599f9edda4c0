"""Run a config: build the system, data, loggers, callbacks and Trainer, then fit.

``fit(cfg)`` is what ``mmdiff fit`` calls; everything here is a plain function usable from a
notebook. The run directory holds ``config.yaml``, ``checkpoints/``, ``samples/`` and the logger's
files, and is the only place a run writes.
"""
from __future__ import annotations

import contextlib
import logging
import pickle
import signal
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig

from mmdiff.callbacks.data_position import DataPositionCallback, StepSeedCallback
from mmdiff.callbacks.data_stats import DataStatsCallback
from mmdiff.callbacks.ema import EMACallback
from mmdiff.callbacks.nan_guard import NaNGuard
from mmdiff.callbacks.periodic_eval import ImageEvalCallback
from mmdiff.callbacks.previews import ImageLoggingCallback
from mmdiff.callbacks.progress import ProgressLogCallback
from mmdiff.callbacks.requeue import RequeueOnSignal, StopForSignal
from mmdiff.callbacks.resources import ResourceProbe
from mmdiff.config.filter_rules import drop_names, parse_filters
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.run.checkpoint_io import AtomicCheckpointIO, read_training_checkpoint
from mmdiff.run.cluster import apply_slurm_allocation, prune_hpc_checkpoints
from mmdiff.run.resume import is_global_rank_zero, plan_start
from mmdiff.io.weights import unpickling_refusal
from mmdiff.config import LoggerKind, save_config, to_container
from mmdiff.errors import CheckpointError, ConfigError, Terminated, UsageError
from mmdiff.run.strategies import build_strategy
from mmdiff.run.wandb_run import RunWandbLogger, run_identity, wandb_run_id
from mmdiff.systems.base import System
from mmdiff.systems.speed import enable_tf32
from mmdiff.systems.registry import get_system

log = logging.getLogger(__name__)

#: Library warnings every run raises that tell its reader nothing (message regexes, Lightning's only).
EXPECTED_WARNINGS = (
    # The frozen encoders (VAE, CLIP) are meant to stay in eval mode while the rest trains.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning's own pytree helper uses a torch class torch has deprecated; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


@contextlib.contextmanager
def expected_warnings_silenced() -> Iterator[None]:
    """Hide :data:`EXPECTED_WARNINGS` (raised from Lightning's modules) inside the block; others still show."""
    with warnings.catch_warnings():
        for pattern in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, module=r"lightning\.")
        yield


def build_system(cfg: DictConfig, resume_hparams: Optional[Dict[str, Any]] = None) -> System:
    """Instantiate the system named by ``cfg.system``; when resuming, from the checkpoint's
    hyper-parameters too (:meth:`System.for_resume`)."""
    system_cls = get_system(cfg.system)
    if resume_hparams is not None:
        return system_cls.for_resume(cfg, resume_hparams)
    return system_cls(cfg)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The webdataset DataModule for ``cfg.data``."""
    return ShardDataModule(cfg.data, seed=cfg.seed)


def build_loggers(cfg: DictConfig, run_dir: Path) -> List[Logger]:
    """W&B (offline unless ``logger.mode: online``), CSV, or none; the resolved config is logged.

    The W&B run id is kept in the run dir (:func:`mmdiff.run.wandb_run.wandb_run_id`), so every
    start of this run dir continues one run, in group ``logger.group`` (default: ``name``)."""
    kind = LoggerKind(cfg.logger.kind)
    if kind == LoggerKind.none:
        return []
    if kind == LoggerKind.csv:
        # Versioned folders (csv/version_N): a resumed run must not overwrite the earlier metrics.
        logger: Logger = CSVLogger(save_dir=str(run_dir), name="csv")
    else:
        mode = cfg.logger.mode
        logger = RunWandbLogger(
            project=cfg.logger.project,
            name=cfg.name,
            save_dir=str(run_dir),
            id=wandb_run_id(run_dir),
            **run_identity(cfg),
            log_checkpoints=cfg.logger.log_checkpoints,
            offline=mode == "offline",
            mode=mode,
            entity=cfg.logger.entity,
            tags=list(cfg.logger.tags),
            resume="allow",
        )
    logger.log_hyperparams(to_container(cfg))
    return [logger]


def build_callbacks(cfg: DictConfig, run_dir: Path, system: System) -> List[Callback]:
    """Checkpointing, NaN guard, LR monitor, EMA (when the system has an EMA target), image logging."""
    t = cfg.trainer
    callbacks: List[Callback] = [
        ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.checkpoint_every_n_steps,
            save_top_k=t.keep_last_n,
            monitor="step",
            mode="max",
            save_last=True,
        ),
        DataStatsCallback(drop_names(parse_filters(list(cfg.data.filters)), int(cfg.data.min_size))),
        ImageLoggingCallback(run_dir / "samples", every_n_steps=cfg.sampling.every_n_steps),
    ]
    if t.nan_guard:
        callbacks.append(NaNGuard(max_bad_steps=t.max_bad_steps))
    if t.probe_resources_every_n_steps > 0:
        callbacks.append(ResourceProbe(run_dir / "resources.csv", t.probe_resources_every_n_steps))
    if not t.enable_progress_bar:
        callbacks.append(ProgressLogCallback(every_n_steps=t.log_every_n_steps))
    if cfg.logger.kind != LoggerKind.none:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if system.ema_target is not None and cfg.model.use_ema:
        callbacks.append(EMACallback(decay=cfg.model.ema_decay))
    if cfg.eval.every_n_steps > 0 and cfg.system == "text_to_image":
        callbacks.append(ImageEvalCallback(cfg.eval, list(cfg.data.val_shards), cfg.data.image_size,
                                           str(cfg.model.clip.name)))
    return callbacks


def _devices(value: str) -> int | str:
    return int(value) if str(value).isdigit() else str(value)


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: List[Callback], loggers: List[Logger]
) -> L.Trainer:
    """A Lightning Trainer from ``cfg.trainer``.

    The strategy comes from :func:`mmdiff.run.strategies.build_strategy` (``fsdp`` = FSDP2 on the
    trainable modules). With ``trainer.exact_resume`` (default) torch's RNG is reseeded per
    training batch and every rank's data position is checkpointed, so an interrupted-and-resumed
    run trains on exactly what an uninterrupted one would (docs/scale_out.md). Under SLURM the
    requeue signal (SIGUSR1) is handled by :class:`mmdiff.callbacks.requeue.RequeueOnSignal`
    (checkpoint at the next optimiser-step boundary on all ranks, then requeue) instead of
    Lightning's handler, which saves wherever the training step happens to be; with
    ``trainer.sigterm_save`` the same callback saves on SIGTERM before the run stops.
    """
    t = cfg.trainer
    callbacks = list(callbacks)
    # Every checkpoint (periodic, last, SLURM requeue) is written atomically, whatever the strategy.
    plugins: List[Any] = [AtomicCheckpointIO()]
    if t.exact_resume:
        callbacks += [DataPositionCallback(), StepSeedCallback(cfg.seed)]
    slurm = SLURMEnvironment.detect()
    if slurm:
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if slurm or t.sigterm_save:
        callbacks.append(RequeueOnSignal(requeue_signal=signal.SIGUSR1 if slurm else None,
                                         sigterm_save=bool(t.sigterm_save),
                                         after_save=lambda _path: prune_hpc_checkpoints(run_dir, keep=1)))
    return L.Trainer(
        plugins=plugins,
        default_root_dir=str(run_dir),
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        sync_batchnorm=False,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        # Lightning counts val_check_interval in batches, across epochs only with
        # check_val_every_n_epoch=None (otherwise it must fit in one epoch); a whole number of
        # accumulation windows per epoch (config check) makes N optimiser steps N × accumulation batches.
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=loggers or False,
    )


def read_resume_checkpoint(cfg: DictConfig, ckpt_path: str) -> Dict[str, Any]:
    """The resume checkpoint, its tensors memory-mapped (so a large file is not read twice);
    one sentence refuses a checkpoint of another system."""
    checkpoint, trained = read_training_checkpoint(ckpt_path, mmap=True)
    if trained.system != cfg.system:
        raise CheckpointError(f"cannot resume from '{ckpt_path}': it is a '{trained.system}' checkpoint and "
                              f"this config trains '{cfg.system}'.")
    return checkpoint


def check_resume_fits(system: System, checkpoint: Dict[str, Any], ckpt_path: str) -> None:
    """Refuse, in one sentence, a resume checkpoint of another architecture (Lightning would find
    out only inside ``fit``, with torch's multi-line key report)."""
    problem = system.weights_mismatch(checkpoint["state_dict"])
    if problem:
        raise CheckpointError(f"cannot resume from '{ckpt_path}': its weights do not fit this config's model "
                              f"({problem}); resume with the config it was trained with.")


@contextlib.contextmanager
def _fresh_hint(auto: bool) -> Iterator[None]:
    """A checkpoint error of a resume the user did not ask for (``auto``) also says how to start over."""
    try:
        yield
    except CheckpointError as err:
        if not auto:
            raise
        raise CheckpointError(f"{str(err).rstrip('.')}; or start a new run over it with --fresh.") from None


def fit(cfg: DictConfig, resume: Optional[str] = None, fresh: bool = False) -> Path:
    """Train ``cfg`` and return the run directory.

    A run dir that holds checkpoints continues from the newest complete one (also a requeued
    SLURM job); ``resume`` is ``"last"`` (the same) or a checkpoint path; ``fresh`` starts at
    step 0 and first moves the earlier run to ``RUN_DIR/superseded/`` (rules:
    :mod:`mmdiff.run.resume`). A run already at ``trainer.max_steps`` ends at once. Under SLURM,
    ``trainer.num_nodes``/``devices`` come from the allocation.
    """
    if fresh and resume is not None:
        raise UsageError("--fresh starts a new run and --resume continues one; pass only one of them.")
    cfg = apply_slurm_allocation(cfg)
    run_dir = Path(cfg.run_dir)
    check_precision(cfg)
    enable_tf32(bool(cfg.trainer.tf32))  # process-wide torch settings, whatever the system
    start = plan_start(run_dir, resume, fresh)
    ckpt_path = str(start.checkpoint) if start.checkpoint is not None else None
    if ckpt_path is not None and start.step >= cfg.trainer.max_steps:
        log.info("%s is finished: step %d of trainer.max_steps=%d, nothing to train (raise trainer.max_steps "
                 "to go on, or start over with --fresh)", run_dir, start.step, cfg.trainer.max_steps)
        return run_dir
    with _fresh_hint(auto=resume is None and ckpt_path is not None):
        resumed = read_resume_checkpoint(cfg, ckpt_path) if ckpt_path is not None else None
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        system = build_system(cfg, resumed["hyper_parameters"] if resumed is not None else None)
        if resumed is not None:
            check_resume_fits(system, resumed, ckpt_path)
            del resumed  # Lightning reads the file again inside fit
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")  # a missing shard fails here, before a run folder or W&B run is made
    if is_global_rank_zero() or not fresh:
        # Under --fresh another rank's copy could land before rank 0 has moved the old one aside.
        save_config(cfg, run_dir)
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, build_callbacks(cfg, run_dir, system), loggers)
    if ckpt_path is None:
        # Lightning would resume from an hpc_ckpt_N.ckpt on its own under SLURM (one this start
        # skipped as incomplete, or one --fresh is moving aside): the decision above is final.
        trainer._checkpoint_connector._ckpt_path = None
        trainer._checkpoint_connector._user_managed = True
    log.info("run directory: %s", run_dir)
    try:
        # Explicit weights_only: a resumed checkpoint is a user path, and torch's default can be
        # switched off by an environment variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
        with expected_warnings_silenced():
            trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as err:  # only the resume checkpoint is unpickled in fit
        raise unpickling_refusal(ckpt_path or "?", err) from None
    except StopForSignal as stop:
        # Saved at a step boundary; on SIGUSR1 the job is already requeued and its W&B run closed.
        if stop.signum == signal.SIGTERM:
            _finish_wandb_after_sigterm(loggers)
            raise Terminated(f"stopped by SIGTERM after step {stop.step}, saved in {stop.path}; rerun "
                             "`mmdiff fit CONFIG` to continue from it.") from None
        log.info("stopped by %s after step %d for a requeue, saved in %s; the next start of this run "
                 "continues from it", signal.Signals(stop.signum).name, stop.step, stop.path)
        return run_dir
    except BaseException as err:
        # After SIGTERM Lightning stops at the next batch with a bare SystemExit (status 0)
        # (trainer.sigterm_save: false), and a helper process that got the same signal (SLURM and
        # killpg signal the whole group; the data module's loader workers ignore it) can fail the
        # fit before the SIGTERM save: either way the run was terminated.
        sigterm = trainer.received_sigterm or any(
            isinstance(c, RequeueOnSignal) and c.sigterm_received for c in trainer.callbacks)
        if sigterm and not isinstance(err, KeyboardInterrupt):
            _finish_wandb_after_sigterm(loggers)
            raise Terminated(f"stopped by SIGTERM after step {trainer.global_step}; rerun `mmdiff fit CONFIG` "
                             "to continue from the newest checkpoint.") from None
        _finish_wandb(loggers, exit_code=1)  # a failed run, marked so in W&B, its files complete
        raise
    _finish_wandb(loggers)
    if trainer.is_global_zero and trainer.global_step >= cfg.trainer.max_steps:
        # A finished run must not be resumed later from a stale requeue checkpoint.
        prune_hpc_checkpoints(run_dir, keep=0)
    log.info("done: checkpoints in %s", run_dir / "checkpoints")
    return run_dir


def _finish_wandb(loggers: List[Logger], exit_code: int = 0) -> None:
    """Close the W&B run with ``exit_code`` so its offline files are complete when ``fit``
    returns or raises (rank 0 only; a run the requeue handler already closed stays closed)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish(exit_code=exit_code)


def _finish_wandb_after_sigterm(loggers: List[Logger]) -> None:
    """Close the W&B run with exit code 143; W&B's service process may have had the SIGTERM too."""
    try:
        _finish_wandb(loggers, exit_code=143)
    except Exception as err:  # its socket is gone: nothing more can reach the run
        log.warning("W&B run not closed: its service process has stopped (%s)", type(err).__name__)


def check_precision(cfg: DictConfig) -> None:
    """Refuse precisions the chosen accelerator cannot run, before anything is built."""
    if cfg.trainer.precision.startswith("16") and not torch.cuda.is_available():
        raise ConfigError("trainer.precision '16-mixed' needs a GPU; use 'bf16-mixed' or '32-true' on CPU.")
