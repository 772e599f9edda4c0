"""Upload a run's offline W&B folders with ``wandb sync`` (``mmdiff sync``; train.sbatch runs it
when a job ends with ``MMDIFF_WANDB_SYNC=1``)."""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import List

from mmdiff.errors import UsageError

log = logging.getLogger(__name__)


def offline_runs(run_dir: str | Path) -> List[Path]:
    """``RUN_DIR/wandb/offline-run-*`` folders, oldest start first (their names begin with the time)."""
    folder = Path(run_dir) / "wandb"
    return sorted(p for p in folder.glob("offline-run-*") if p.is_dir()) if folder.is_dir() else []


def sync_offline_runs(run_dir: str | Path) -> int:
    """Run ``wandb sync`` on every offline run folder of ``run_dir``; its exit code (0 when there
    is nothing to sync). ``wandb sync`` itself skips folders it has already uploaded."""
    runs = offline_runs(run_dir)
    if not runs:
        log.info("no offline W&B run in %s: nothing to sync", Path(run_dir) / "wandb")
        return 0
    exe = shutil.which("wandb")
    if exe is None:
        raise UsageError("the `wandb` command is not on PATH; activate the environment mmdiff is installed in.")
    log.info("wandb sync: %d offline run folder(s) in %s", len(runs), Path(run_dir) / "wandb")
    return subprocess.run([exe, "sync", *map(str, runs)], check=False).returncode


__all__ = ["offline_runs", "sync_offline_runs"]
