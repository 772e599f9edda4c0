"""Requeue inside SLURM's signal window and SIGTERM saves, on the local cluster (marked ``slurm``).

- SIGUSR1 (what ``--signal=SIGUSR1@90`` sends) during a run with validation, previews and W&B on:
  ``scontrol requeue`` comes within seconds, the requeued start logs every step once, and with
  ``trainer.accumulate_grad_batches=2`` its losses equal an uninterrupted run's.
- SIGTERM to the job: it saves and stops; requeued, it resumes from that save; at most one
  ``hpc_ckpt`` is ever on disk.
"""
from __future__ import annotations

import csv
import re
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from test_sbatch import (REPO, _assert_completed, _fit_overrides, _global_step, _logged_losses, in_queue,
                         output_of, submit, wait_for)
from test_sbatch import cluster  # noqa: F401  (the fixture)

# Generous timeouts: the local cluster has one node, and other jobs may hold it first.
pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cluster"), pytest.mark.timeout(3600)]

CONFIG = str(REPO / "configs" / "demo" / "text_to_image.yaml")
MAX_STEPS = 24


def _overrides(run_dir: Path, shards: Path) -> List[str]:
    """2 ranks, 2 batches per step, validation and previews every 6 steps, W&B offline."""
    replaced = ("trainer.val_every_n_steps", "trainer.log_every_n_steps", "sampling.every_n_steps",
                "data.steps_per_epoch", "trainer.checkpoint_every_n_steps")
    return [o for o in _fit_overrides(run_dir, shards, MAX_STEPS) if not o.startswith(replaced)] + [
        "trainer.accumulate_grad_batches=2", "data.steps_per_epoch=8", "trainer.val_every_n_steps=6",
        "sampling.every_n_steps=6", "trainer.checkpoint_every_n_steps=6", "trainer.log_every_n_steps=1"]


def _submit(run_dir: Path, shards: Path, workdir: Path) -> str:
    return submit([CONFIG, *_overrides(run_dir, shards)], workdir, env={"WANDB_SILENT": "true"},
                  sbatch_opts=["--time=20"])


def _wait_for_first_checkpoint(job_id: str, run_dir: Path, workdir: Path) -> None:
    deadline = time.monotonic() + 1800  # the local cluster's one node may be busy with other jobs first
    while not list((run_dir / "checkpoints").glob("step*.ckpt")):
        if not in_queue(job_id) or time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=20)
            pytest.fail(f"job {job_id} never reached step 6; output:\n{output_of(workdir, job_id)[-4000:]}")
        time.sleep(0.5)


def _assert_every_step_once(run_dir: Path) -> int:
    """The two starts' logged steps join without a gap or a repeat; returns where the second began."""
    first, second = _logged_losses(run_dir)
    resumed_at = min(second)
    assert 6 <= resumed_at < MAX_STEPS, resumed_at
    assert sorted(first) == list(range(resumed_at)), (sorted(first), resumed_at)
    assert sorted(second) == list(range(resumed_at, MAX_STEPS)), sorted(second)
    return resumed_at


def test_sigusr1_requeues_within_seconds_and_resumes_exactly(tmp_path: Path,
                                                            demo_shards: Path) -> None:
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    straight = _submit(straight_dir, demo_shards, tmp_path)
    _assert_completed(wait_for(straight, tmp_path, timeout_s=1800), straight, tmp_path)

    job_id = _submit(run_dir, demo_shards, tmp_path)
    _wait_for_first_checkpoint(job_id, run_dir, tmp_path)
    time.sleep(2)  # a few steps on, so the signal lands mid-epoch
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=20)
    out = _assert_completed(wait_for(job_id, tmp_path, timeout_s=1800), job_id, tmp_path)

    assert f"job {job_id} restart 1" in out, "the job was not requeued"
    match = re.search(rf"requeue: saved step (\d+) and requeued job {job_id} ([\d.]+) s after SIGUSR1", out)
    assert match, out[-4000:]
    seconds = float(match.group(2))
    print(f"SIGUSR1 -> scontrol requeue: {seconds:.1f} s (saved step {match.group(1)})")
    assert seconds < 30, seconds
    assert re.search(r"resuming \S+ from \S*/hpc_ckpt_1\.ckpt \(step \d+\)", out), out[-4000:]
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == MAX_STEPS

    resumed_at = _assert_every_step_once(run_dir)
    assert resumed_at == int(match.group(1))
    (reference,) = _logged_losses(straight_dir)
    first, second = _logged_losses(run_dir)
    assert {**first, **second} == reference  # exact, across the accumulation windows


def _csv_steps(run_dir: Path) -> List[List[int]]:
    """The steps with a ``train/loss`` row in each start's CSV log (``csv/version_N``, one per start)."""
    starts = []
    for version in sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            starts.append(sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}))
    return starts


def test_sigterm_saves_and_the_requeued_job_resumes_from_it(tmp_path: Path, demo_shards: Path) -> None:
    """SIGTERM to every process of the job (what preemption and ``scontrol requeue`` send first):
    the ranks save at a step boundary and exit 143; ``scontrol requeue`` of the stopped job resumes
    from that file. Sent with ``scancel --signal=TERM`` (no SIGKILL after it): the local cluster's
    KillWait (5 s) is shorter than two demo steps on its CPUs. CSV logs: SLURM's SIGTERM also ends
    W&B's service process (wandb-core), see docs/scale_out.md."""
    run_dir = tmp_path / "run"
    job_id = submit([CONFIG, *_overrides(run_dir, demo_shards), "logger.kind=csv"], tmp_path,
                    sbatch_opts=["--time=20"])
    _wait_for_first_checkpoint(job_id, run_dir, tmp_path)
    time.sleep(2)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=20)
    most = 0
    while in_queue(job_id):
        most = max(most, len(list(run_dir.glob("hpc_ckpt_*.ckpt"))))
        time.sleep(0.2)
    out = output_of(tmp_path, job_id)
    match = re.search(r"stopped by SIGTERM after step (\d+), saved in \S*hpc_ckpt_1\.ckpt", out)
    assert match, out[-4000:]
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=20)
    deadline = time.monotonic() + 900
    while not in_queue(job_id) and time.monotonic() < deadline:  # back in the queue as PENDING
        time.sleep(0.2)
    while in_queue(job_id) and time.monotonic() < deadline:
        most = max(most, len(list(run_dir.glob("hpc_ckpt_*.ckpt"))))
        time.sleep(0.2)
    out = _assert_completed(wait_for(job_id, tmp_path, timeout_s=60), job_id, tmp_path)

    assert f"job {job_id} restart 1" in out, "the job was not requeued"
    assert re.search(r"resuming \S+ from \S*/hpc_ckpt_1\.ckpt \(step \d+\)", out), out[-4000:]
    assert most <= 1, f"{most} hpc checkpoints on disk at once"
    first, second = _csv_steps(run_dir)
    saved = int(match.group(1))  # Lightning logs the step that ends at global step s as row s - 1
    assert first == list(range(saved)) and second == list(range(saved, MAX_STEPS)), (first, second)


def test_sigterm_with_wandb_on_still_saves(tmp_path: Path, demo_shards: Path) -> None:
    """With W&B on, SLURM's SIGTERM also ends W&B's service process; the fit stops logging to W&B
    with a warning and still saves at a step boundary and exits 143, and the requeued job resumes
    from that file."""
    run_dir = tmp_path / "run"
    job_id = _submit(run_dir, demo_shards, tmp_path)
    _wait_for_first_checkpoint(job_id, run_dir, tmp_path)
    time.sleep(2)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=20)
    while in_queue(job_id):
        time.sleep(0.2)
    out = output_of(tmp_path, job_id)
    assert re.search(r"stopped by SIGTERM after step \d+, saved in \S*hpc_ckpt_1\.ckpt", out), out[-4000:]
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=20)
    deadline = time.monotonic() + 900
    while not in_queue(job_id) and time.monotonic() < deadline:  # back in the queue as PENDING
        time.sleep(0.2)
    out = _assert_completed(wait_for(job_id, tmp_path, timeout_s=900), job_id, tmp_path)
    assert re.search(r"resuming \S+ from \S*/hpc_ckpt_1\.ckpt \(step \d+\)", out), out[-4000:]
