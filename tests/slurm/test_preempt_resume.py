"""A SLURM job killed without warning (SIGKILL: preemption without a signal, a dead node) and
requeued resumes from its newest complete checkpoint, overwriting none of the first start's
(marked ``slurm``; skipped without a cluster; bring-up: tests/slurm/test_sbatch.py)."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from test_sbatch import (  # noqa: F401  (cluster: the fixture that skips without a usable cluster)
    REPO,
    _assert_completed,
    _fit_overrides,
    _global_step,
    _logged_losses,
    cluster,
    in_queue,
    job_state,
    output_of,
    submit,
    wait_for,
)

pytestmark = pytest.mark.slurm

_LIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def _fail_with_output(job_id: str, workdir: Path, why: str) -> None:
    subprocess.run(["scancel", job_id], timeout=20)
    pytest.fail(f"job {job_id} {why}; output:\n{output_of(workdir, job_id)[-4000:]}")


def _requeue_when_ended(job_id: str, workdir: Path, timeout_s: float = 120) -> None:
    """`scontrol requeue` once the killed job has ended (a job still completing is refused)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = job_state(job_id)
        if state not in _LIVE:
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=20)
            if done.returncode == 0:
                return
        if time.monotonic() > deadline:
            _fail_with_output(job_id, workdir, f"could not be requeued (state {state})")
        time.sleep(1)


@pytest.mark.usefixtures("cluster")
@pytest.mark.timeout(3600)  # two starts, each may wait in a busy queue
def test_sigkilled_job_requeued_resumes_from_newest_checkpoint(tmp_path: Path, demo_shards: Path) -> None:
    run_dir, max_steps = tmp_path / "run", 24
    overrides = [o for o in _fit_overrides(run_dir, demo_shards, max_steps)
                 if not o.startswith(("trainer.checkpoint_every_n_steps", "trainer.log_every_n_steps"))]
    job_id = submit(
        [str(REPO / "configs" / "demo" / "text_to_image.yaml"), *overrides, "trainer.checkpoint_every_n_steps=4",
         "trainer.keep_last_n=-1", "trainer.log_every_n_steps=1", "data.steps_per_epoch=7"],
        tmp_path, env={"WANDB_SILENT": "true"}, sbatch_opts=["--time=20"],
    )
    # Kill once two periodic checkpoints exist, so there is an older one to leave alone.
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 1500  # queue time included
    while len(list(checkpoints.glob("step*.ckpt"))) < 2:
        if not in_queue(job_id) or time.monotonic() > deadline:
            _fail_with_output(job_id, tmp_path, "never wrote two periodic checkpoints")
        time.sleep(1)
    time.sleep(2)  # a few steps past the checkpoint: they are lost, nothing else is
    # A node failure: every process of the job dies at once, with no signal to save on. (`scancel
    # --signal=KILL` cancels the job, and SLURM then sends the ranks SIGTERM first, which saves.)
    subprocess.run(["pkill", "-KILL", "-f", f"run_dir={run_dir} "], check=True, timeout=20)
    _requeue_when_ended(job_id, tmp_path)

    # What the killed start left (the job is pending: nothing writes now).
    first = {p.name: p.read_bytes() for p in checkpoints.glob("step*.ckpt")}
    newest = max(_global_step(checkpoints / name) for name in first)
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt")), "SIGKILL leaves no time for a requeue checkpoint"

    out = _assert_completed(wait_for(job_id, tmp_path, timeout_s=1800), job_id, tmp_path)
    assert f"job {job_id} restart 1" in out, "the job was not requeued"
    resumed = re.findall(rf"resuming {re.escape(str(run_dir))} from (\S+) \(step (\d+)\)", out)
    assert resumed and int(resumed[0][1]) == newest, (resumed, newest, out[-4000:])
    assert _global_step(checkpoints / "last.ckpt") == max_steps
    # No file of the first start was overwritten by the second (a fresh start would have).
    assert {name: (checkpoints / name).read_bytes() for name in first} == first
    starts = _logged_losses(run_dir)
    assert len(starts) == 2 and min(starts[1]) == newest  # continued where the newest checkpoint was
    assert sorted(starts[1]) == list(range(newest, max_steps))
