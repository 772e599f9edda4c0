"""Where a run starts: the newest complete checkpoint of its run directory, or step 0 (``--fresh``).

One rule for every start of ``mmdiff fit`` in a run directory — a rerun, a resubmitted job, a
SLURM requeue (``SLURM_RESTART_COUNT > 0``), each rank of a multi-rank job:

- no flag (``resume=None``) or ``resume="last"``: continue from the newest *complete* training
  checkpoint in the run dir (``checkpoints/*.ckpt``, ``hpc_ckpt_*.ckpt``), else start at step 0;
- ``resume=PATH``: that file, which must be complete. In a restarted job (SLURM requeue,
  torchrun restart) the run dir's newest complete checkpoint wins when it is further on: the
  restart reruns the original command line, whose path is older than the run's progress;
- ``fresh=True``: step 0. Global rank 0 first moves the earlier run's files
  (:data:`SUPERSEDED_FILES`, ``hpc_ckpt_*.ckpt``) into ``RUN_DIR/superseded/<UTC time>/``, so nothing
  of it is overwritten and the new run gets a new W&B id. In a restarted job the fresh start
  already happened in its first start, so ``fresh`` then resumes like no flag.

Newest = highest global step, ties by modification time. Complete = it reads with
``weights_only`` and holds what Lightning restores (:data:`RESUME_KEYS`); any other file is skipped
with a warning naming it.

Every rank decides alone, from the files, before any process group exists, and all get the same
answer: no checkpoint is written before every rank has joined the process group, and with
``fresh`` the answer is step 0 whatever a rank sees. Only global rank 0 moves files; the other
ranks must write nothing in the run dir that a move could take away (``fit`` leaves
``config.yaml`` to rank 0 then).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

from mmdiff.errors import CheckpointError
from mmdiff.run.checkpoint_io import read_training_checkpoint
from mmdiff.run.cluster import HPC_CHECKPOINT_PATTERN, slurm_allocation
from mmdiff.run.wandb_run import RUN_ID_FILE

log = logging.getLogger(__name__)

#: What Lightning restores when it resumes a fit, beyond the weights.
RESUME_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step", "epoch")

#: The earlier run's files ``--fresh`` moves aside (besides ``hpc_ckpt_*.ckpt``): what a new run in
#: the same folder would overwrite, continue or reuse (the W&B id is also read back from ``wandb/``).
SUPERSEDED_FILES = ("checkpoints", "config.yaml", RUN_ID_FILE, "wandb", "csv", "samples", "resources.csv")

SUPERSEDED_DIR = "superseded"


@dataclass(frozen=True)
class Start:
    """Where ``fit`` starts: ``checkpoint`` at global step ``step``, or step 0 (``checkpoint=None``)."""

    checkpoint: Optional[Path] = None
    step: int = 0


def is_global_rank_zero(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process is global rank 0, from the environment alone (no process group yet):
    ``RANK`` (torchrun), ``SLURM_PROCID`` (a SLURM-managed run), else ``NODE_RANK``/``LOCAL_RANK``
    (Lightning's own launcher starts ranks > 0 with ``LOCAL_RANK`` set)."""
    env = os.environ if env is None else env
    if env.get("RANK", "").strip():
        return env["RANK"].strip() == "0"
    if slurm_allocation(env) is not None:
        return env.get("SLURM_PROCID", "0").strip() in ("", "0")
    return all(env.get(name, "0").strip() in ("", "0") for name in ("NODE_RANK", "LOCAL_RANK"))


def restart_count(env: Optional[Mapping[str, str]] = None) -> int:
    """How often this job was restarted: ``SLURM_RESTART_COUNT`` (requeue) or torchrun's
    ``TORCHELASTIC_RESTART_COUNT``; 0 for a first start."""
    env = os.environ if env is None else env
    counts = (env.get(name, "").strip() for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))
    return max((int(c) for c in counts if c.isdigit()), default=0)


def training_checkpoints(run_dir: Path) -> List[Path]:
    """The run's checkpoint files: ``checkpoints/*.ckpt`` and ``hpc_ckpt_N.ckpt`` (temp files excluded)."""
    run_dir = Path(run_dir)
    periodic = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    requeue = sorted(p for p in run_dir.glob("hpc_ckpt_*.ckpt") if HPC_CHECKPOINT_PATTERN.match(p.name))
    return [p for p in periodic + requeue if p.is_file()]


def checkpoint_step(path: Path) -> int:
    """The global step a training checkpoint resumes at; :class:`CheckpointError` when the file
    does not read (weights-only, tensors memory-mapped) or lacks what a resume restores."""
    checkpoint, _ = read_training_checkpoint(path, mmap=True)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"'{path}' cannot be resumed from: it has no {', '.join(missing)} "
                              "(a weights-only or partial checkpoint).")
    return int(checkpoint["global_step"])


def newest_complete_checkpoint(run_dir: Path, report: bool = True) -> Optional[Tuple[Path, int]]:
    """The run's newest complete checkpoint and its step (highest step, ties by modification
    time), or ``None``; each incomplete file is skipped with a warning when ``report``."""
    found = []
    for path in training_checkpoints(run_dir):
        try:
            found.append((checkpoint_step(path), path.stat().st_mtime_ns, str(path), path))
        except (CheckpointError, OSError) as err:
            if report:
                log.warning("skipping checkpoint %s: %s", path, err)
    if not found:
        return None
    step, _, _, path = max(found)
    return path, step


def supersede_run(run_dir: Path, now: Optional[datetime] = None) -> Optional[Path]:
    """Move the earlier run's files out of the way of a fresh start, into
    ``RUN_DIR/superseded/<UTC time>/``; returns that folder, or ``None`` when there was nothing.
    Global rank 0 only (renames in one file system: nothing is copied or deleted)."""
    run_dir = Path(run_dir)
    earlier = [run_dir / name for name in SUPERSEDED_FILES if (run_dir / name).exists()]
    earlier += sorted(p for p in run_dir.glob("hpc_ckpt_*.ckpt") if HPC_CHECKPOINT_PATTERN.match(p.name))
    if not earlier:
        return None
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    target = run_dir / SUPERSEDED_DIR / stamp
    for n in range(1, 1000):
        try:
            target.mkdir(parents=True)
            break
        except FileExistsError:  # two fresh starts within a second
            target = run_dir / SUPERSEDED_DIR / f"{stamp}-{n}"
    for path in earlier:
        os.replace(path, target / path.name)
    log.info("--fresh: moved the earlier run's %s to %s", ", ".join(p.name for p in earlier), target)
    return target


def plan_start(
    run_dir: Path, resume: Optional[str] = None, fresh: bool = False, env: Optional[Mapping[str, str]] = None
) -> Start:
    """Where ``fit`` starts in ``run_dir`` (the rule in this module's docstring); with ``fresh``,
    global rank 0 moves the earlier run aside first. Raises :class:`CheckpointError` for an
    explicit ``resume`` path that does not exist or is incomplete."""
    run_dir = Path(run_dir)
    rank_zero = is_global_rank_zero(env)
    restarts = restart_count(env)
    if fresh and restarts:
        if rank_zero:
            log.info("restart %d of this job: --fresh applied to its first start; continuing the run", restarts)
        fresh = False
    if fresh:
        if rank_zero:
            supersede_run(run_dir)
        return Start()

    if resume not in (None, "last"):
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"checkpoint '{resume}' does not exist; pass a .ckpt path or 'last'.")
        chosen: Tuple[Path, int] = (path, checkpoint_step(path))
        if restarts:
            newest = newest_complete_checkpoint(run_dir, report=rank_zero)
            if newest is not None and newest[1] > chosen[1]:
                chosen = newest
    else:
        newest = newest_complete_checkpoint(run_dir, report=rank_zero)
        if newest is None:
            if resume == "last" and rank_zero:
                log.warning("no complete checkpoint in %s; starting from scratch", run_dir)
            return Start()
        chosen = newest
    if rank_zero:
        log.info("resuming %s from %s (step %d)", run_dir, chosen[0], chosen[1])
    return Start(*chosen)


__all__ = [
    "RESUME_KEYS",
    "SUPERSEDED_DIR",
    "SUPERSEDED_FILES",
    "Start",
    "checkpoint_step",
    "is_global_rank_zero",
    "newest_complete_checkpoint",
    "plan_start",
    "restart_count",
    "supersede_run",
    "training_checkpoints",
]
