"""The W&B side of a training run: a run id that follows the run directory, group and job type,
and checkpoints uploaded as artifacts.

The run id lives in ``RUN_DIR/wandb_run_id`` (written once), so every start of the experiment in
that folder (a SLURM requeue, a resubmitted job, a rerun, a notebook) continues one W&B run,
whatever the job id; ``mmdiff fit --fresh`` moves it (and ``wandb/``) aside, so a new run starts.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Set

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from mmdiff.config import CheckpointUpload

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"

# W&B's folder of one start of a run: wandb/[offline-]run-YYYYMMDD_HHMMSS-<run id>.
_RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


def wandb_run_id(run_dir: Path) -> str:
    """The run id kept in ``run_dir/wandb_run_id``; on first use it is written there: the id of
    the newest W&B run already in ``run_dir/wandb`` (a run dir from before the file existed, whose
    id was ``slurm-<job id>``), else a new one."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    candidate = _existing_run_id(Path(run_dir) / "wandb") or uuid.uuid4().hex[:12]
    # Every rank of a job may get here at once: a hard link creates the file only if it does not
    # exist yet (atomic, also on NFS), so the first writer's id wins and every rank reads that one.
    id_file.parent.mkdir(parents=True, exist_ok=True)
    staged = id_file.with_name(f".{RUN_ID_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    staged.write_text(candidate + "\n")
    try:
        os.link(staged, id_file)
    except FileExistsError:
        pass
    finally:
        staged.unlink()
    return id_file.read_text().strip()


def _existing_run_id(wandb_dir: Path) -> str | None:
    """The run id of the newest start in a W&B folder, or None."""
    starts = [m.groups() for p in (wandb_dir.iterdir() if wandb_dir.is_dir() else ())
              if p.is_dir() and not p.is_symlink() and (m := _RUN_FOLDER.match(p.name))]
    return max(starts)[1] if starts else None


def run_identity(cfg: DictConfig) -> Dict[str, Any]:
    """``group`` (default: the experiment ``name``) and ``job_type`` (default: the system name) of
    a training run; ``mmdiff eval`` runs join the same group with job type ``eval``."""
    return {"group": cfg.logger.group or cfg.name, "job_type": cfg.logger.job_type or cfg.system}


def eval_run_options(cfg: DictConfig) -> Dict[str, Any]:
    """Keyword arguments of :func:`mmdiff.eval.wandb_log.log_eval_to_wandb` for an evaluation of a
    checkpoint trained with ``cfg``: its project, entity, mode and group; the training run's id
    (when its run dir is at hand) goes into the eval run's config."""
    options: Dict[str, Any] = {"project": cfg.logger.project, "entity": cfg.logger.entity,
                               "mode": cfg.logger.mode, "group": run_identity(cfg)["group"]}
    id_file = Path(cfg.run_dir) / RUN_ID_FILE
    options["training_run_id"] = id_file.read_text().strip() if id_file.is_file() else None
    return options


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger with checkpoint upload that works offline too.

    Lightning's own ``log_model`` refuses offline mode and aliases versions ``latest``/``best``;
    here ``log_checkpoints: all`` uploads each periodic checkpoint as it is written (aliased by its
    file name, ``step0000300``) and ``last`` or ``all`` uploads ``last.ckpt`` once training ends
    (alias ``last``), all as versions of one artifact ``checkpoints-<run id>`` of type ``model``.
    """

    def __init__(self, *, log_checkpoints: str = CheckpointUpload.none.value, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_checkpoints = CheckpointUpload(log_checkpoints)
        self._uploaded: Set[str] = set()
        self._ckpt_callback: ModelCheckpoint | None = None
        # The requeue handler finalizes (and closes the run) before Lightning's own finalize.
        self._finalized = False
        self._service_gone = False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Lightning's, except that a W&B service process that has gone away ends W&B logging with
        one warning instead of failing the fit. SLURM's SIGTERM (preemption, ``scontrol requeue``)
        reaches every process of the job, W&B's service too, and the fit still has to reach its
        SIGTERM save; every W&B logging call (images, tables) ends here."""
        if self._service_gone:
            return
        try:
            super().log_metrics(metrics, step)
        except OSError as err:  # ConnectionResetError / BrokenPipeError on the service's socket
            self._service_gone = True
            log.warning("W&B stopped answering (%s: %s); this run logs nothing more to W&B. Its service "
                        "process may have had the job's SIGTERM.", type(err).__name__, err)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        """Called by ModelCheckpoint on rank 0 after each file it writes."""
        self._ckpt_callback = checkpoint_callback
        if self.log_checkpoints != CheckpointUpload.all:
            return
        for path in sorted(checkpoint_callback.best_k_models):
            if path not in self._uploaded and Path(path).is_file():
                self._upload(path, [Path(path).stem])

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Upload ``last.ckpt`` (alias ``last``) once a run ends successfully (a requeue stop
        counts: the requeued job uploads its own ``last`` later, and the alias moves to it)."""
        callback = self._ckpt_callback
        if (status != "success" or self.log_checkpoints == CheckpointUpload.none or callback is None
                or self._experiment is None or self._finalized):
            return
        self._finalized = True
        last = callback.last_model_path
        if last and Path(last).is_file():
            self._upload(last, ["last"])

    def _upload(self, path: str, aliases: list) -> None:
        import wandb  # imported by WandbLogger already; local to keep this module's import light

        artifact = wandb.Artifact(name=f"checkpoints-{self.experiment.id}", type="model",
                                  metadata={"original_filename": Path(path).name})
        artifact.add_file(path, name=Path(path).name)
        self.experiment.log_artifact(artifact, aliases=aliases)
        self._uploaded.add(path)
        log.info("uploaded %s to W&B (aliases %s)", path, ", ".join(aliases))


__all__ = ["RUN_ID_FILE", "RunWandbLogger", "eval_run_options", "run_identity", "wandb_run_id"]
