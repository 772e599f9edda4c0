"""MMDIFF_WANDB_SYNC=1: slurm/train.sbatch uploads the run's offline W&B folders when the job ends,
and not when it is being requeued (marked ``slurm``; skipped without a cluster). A fake ``wandb``
first on PATH records its arguments; the command on the ranks is a stand-in for ``mmdiff fit``."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from test_sbatch import cluster  # noqa: F401 (the fixture that skips without a cluster)
from test_sbatch import REPO, output_of, submit, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cluster")]

DEMO = REPO / "configs" / "demo" / "text_to_image.yaml"
ONE_RANK = ["--ntasks-per-node=1", "--time=5"]


def fake_wandb(tmp_path: Path) -> Dict[str, str]:
    """Environment with a ``wandb`` first on PATH that appends ``restart=N ARGS`` to FAKE_WANDB_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "wandb"
    script.write_text('#!/usr/bin/env bash\necho "restart=${SLURM_RESTART_COUNT:-0} $*" >> "$FAKE_WANDB_LOG"\n')
    script.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {"PATH": path, "FAKE_WANDB_LOG": str(tmp_path / "wandb_calls.txt"), "MMDIFF_WANDB_SYNC": "1"}


def wandb_calls(env: Dict[str, str]) -> List[str]:
    log = Path(env["FAKE_WANDB_LOG"])
    return log.read_text().splitlines() if log.is_file() else []


def _offline_runs(run_dir: Path) -> List[Path]:
    """Two offline starts of one W&B run, as a requeued job leaves them."""
    folders = [run_dir / "wandb" / f"offline-run-2026010{i}_000000-abc" for i in (1, 2)]
    for folder in folders:
        folder.mkdir(parents=True)
    return folders


def test_sync_when_the_job_ends(tmp_path: Path) -> None:
    env = fake_wandb(tmp_path)
    run_dir = tmp_path / "run"
    folders = _offline_runs(run_dir)
    job_id = submit([str(DEMO), f"run_dir={run_dir}"], tmp_path, env={**env, "MMDIFF_CMD": "true"},
                    sbatch_opts=ONE_RANK)
    assert wait_for(job_id, tmp_path, timeout_s=600) == "COMPLETED", output_of(tmp_path, job_id)
    assert wandb_calls(env) == [f"restart=0 sync {folders[0]} {folders[1]}"], output_of(tmp_path, job_id)


def test_no_sync_on_requeue_only_at_the_end(tmp_path: Path) -> None:
    """The first start requeues itself (as mmdiff does on SIGUSR1): no sync then; the rerun ends
    normally and syncs once."""
    env = fake_wandb(tmp_path)
    run_dir = tmp_path / "run"
    _offline_runs(run_dir)
    requeue = tmp_path / "requeue_once.sh"
    requeue.write_text('#!/usr/bin/env bash\nif [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then\n'
                       '  scontrol requeue "$SLURM_JOB_ID"; sleep 60\nfi\n')
    requeue.chmod(0o755)
    job_id = submit([str(DEMO), f"run_dir={run_dir}"], tmp_path, env={**env, "MMDIFF_CMD": str(requeue)},
                    sbatch_opts=ONE_RANK)
    state = wait_for(job_id, tmp_path, timeout_s=600)
    out = output_of(tmp_path, job_id)
    assert state == "COMPLETED" and f"job {job_id} restart 1" in out, out
    calls = wandb_calls(env)
    assert len(calls) == 1 and calls[0].startswith("restart=1 sync "), (calls, out)
