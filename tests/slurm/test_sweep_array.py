"""slurm/sweep.sbatch on the local SLURM cluster (marked ``slurm``; skipped when there is none):
a job array over a sweep file trains one config per task, each into its own run dir and W&B run,
all in one W&B group; an array task beyond the sweep fails with the --array to use."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from test_sbatch import cluster  # noqa: F401 (the fixture that skips without a cluster)
from test_sbatch import REPO, _fit_overrides, _global_step, job_state, output_of, submit, wait_for
from test_wandb_sync import fake_wandb, wandb_calls

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cluster")]

SWEEP_SBATCH = REPO / "slurm" / "sweep.sbatch"
DEMO = REPO / "configs" / "demo" / "text_to_image.yaml"
ONE_RANK = ["--ntasks-per-node=1", "--time=10"]
LRS = [1.0e-4, 3.0e-4, 1.0e-3]


def _read_offline_run(folder: Path) -> Dict:
    sys.path.insert(0, str(REPO / "tests"))
    from wandb_offline import read_run

    return read_run(folder)


def _sweep_file(tmp_path: Path) -> Path:
    sweep = tmp_path / "lr.yaml"
    sweep.write_text("name: tiny-lr\nlist:\n" + "".join(f"  - {{optim.lr: {lr}}}\n" for lr in LRS))
    return sweep


def _tiny_fit(run_dir: Path, shards: Path) -> List[str]:
    steps = [o for o in _fit_overrides(run_dir, shards, max_steps=4) if not o.startswith("trainer.strategy")]
    return [*steps, "trainer.strategy=auto"]


def task_state(array_id: str, index: int) -> str:
    """SLURM's state for one array task: scontrol while it remembers the task (MinJobAge), else
    slurm/local's jobcomp log, where a task is listed under its own job id with its array ids."""
    state = job_state(f"{array_id}_{index}")
    jobcomp = Path("/var/log/slurm/jobcomp.log")
    if state == "UNKNOWN" and jobcomp.is_file():
        found = re.findall(rf"JobState=(\S+) .*ArrayJobId={array_id} ArrayTaskId={index} ", jobcomp.read_text())
        state = found[-1] if found else state
    return state


def _task_outputs(workdir: Path, array_id: str, count: int) -> List[str]:
    return [output_of(workdir, f"{array_id}_{i}") for i in range(count)]


def test_sweep_array_trains_one_run_per_task_in_one_group(tmp_path: Path, demo_shards: Path) -> None:
    """3 array tasks → 3 run dirs RUN_DIR/<sweep name>/task-<I>, each trained with its task's lr
    (the saved config says so), each its own W&B run, all runs in the group named by the sweep;
    with MMDIFF_WANDB_SYNC=1 each task syncs its own run when it ends."""
    runs = tmp_path / "runs"
    env = {**fake_wandb(tmp_path), "WANDB_SILENT": "true"}
    array_id = submit([str(DEMO), str(_sweep_file(tmp_path)), *_tiny_fit(runs, demo_shards)], tmp_path,
                      env=env, script=SWEEP_SBATCH,
                      sbatch_opts=[*ONE_RANK, "--array=0-2", f"--output={tmp_path}/slurm-%A_%a.out"])
    wait_for(array_id, tmp_path, timeout_s=600)
    outputs = _task_outputs(tmp_path, array_id, 3)
    for i, out in enumerate(outputs):
        assert task_state(array_id, i) == "COMPLETED", f"task {i}:\n{out[-3000:]}"

    run_ids, folders = set(), []
    for i, lr in enumerate(LRS):
        run_dir = runs / "tiny-lr" / f"task-{i}"
        assert _global_step(run_dir / "checkpoints" / "last.ckpt") == 4, outputs[i][-3000:]
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
        (folder,) = (run_dir / "wandb").glob("offline-run-*")
        folders.append(folder)
        run = _read_offline_run(folder)
        assert run["run"]["group"] == "tiny-lr"
        assert run["config"]["optim"]["lr"] == pytest.approx(lr)
        run_ids.add(run["run"]["id"])
    assert len(run_ids) == 3, "every task is its own W&B run"
    assert sorted(p.name for p in runs.iterdir()) == ["tiny-lr"]
    assert sorted(wandb_calls(env)) == sorted(f"restart=0 sync {f}" for f in folders)


def test_sweep_array_task_outside_the_sweep_says_which_array(tmp_path: Path) -> None:
    """--array=3 on a 3-task sweep: the task fails at once with one line naming --array=0-2."""
    array_id = submit([str(DEMO), str(_sweep_file(tmp_path)), f"run_dir={tmp_path}/runs"], tmp_path,
                      script=SWEEP_SBATCH,
                      sbatch_opts=[*ONE_RANK, "--array=3", f"--output={tmp_path}/slurm-%A_%a.out"])
    wait_for(array_id, tmp_path, timeout_s=600)
    out = output_of(tmp_path, f"{array_id}_3")
    assert task_state(array_id, 3) == "FAILED", out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sbatch --array=0-2" in errors[0], out
    assert not re.search(r"srun|Traceback", out), out
    assert not (tmp_path / "runs").exists()
