"""slurm/train.sbatch on a real SLURM cluster (marked ``slurm``; skipped when there is none).

Bring up the one-node local cluster first (as root)::

    slurm/local/install.sh && slurm/local/start.sh
    .venv/bin/python -m pytest -m slurm tests/slurm -q

Every test submits ``slurm/train.sbatch`` with the GPU request removed (``--gpus-per-node=0``) and
two CPU ranks (``--ntasks-per-node=2 --cpus-per-task=1``), then polls ``squeue`` until the job
leaves the queue (a requeued job stays in it) and reads its ``slurm-<id>.out``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "train.sbatch"
PROBE = Path(__file__).resolve().parent / "rank_probe.py"
CPU_TWO_RANKS = ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
USABLE_NODE_STATES = ("idle", "mixed", "allocated", "completing")


def _cluster_problem() -> Optional[str]:
    """Why SLURM tests cannot run here, or None when a cluster answers with a usable node."""
    for tool in ("sbatch", "squeue", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not on PATH; install SLURM (sudo slurm/local/install.sh) to run these tests"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s; start the cluster with sudo slurm/local/start.sh"
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no output"])[0]
        return f"the SLURM cluster is not up ({first}); start it with sudo slurm/local/start.sh"
    states = out.stdout.split()
    if not any(s.rstrip("*~#!%$@^-") in USABLE_NODE_STATES for s in states):
        return f"no usable SLURM node (sinfo: {states or 'none'}); start it with sudo slurm/local/start.sh"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _job_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The submitting environment: this venv first on PATH, no SLURM_* from an outer job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def submit(
    args: Sequence[str], workdir: Path, env: Optional[Dict[str, str]] = None, sbatch_opts: Sequence[str] = (),
    script: Path = SBATCH,
) -> str:
    """``sbatch`` ``script`` (train.sbatch) with ``args`` from ``workdir``; returns the job id.
    ``sbatch_opts`` come after the defaults, so they win over them."""
    cmd = [
        "sbatch", "--parsable", f"--chdir={workdir}", f"--output={workdir}/slurm-%j.out",
        *CPU_TWO_RANKS, *sbatch_opts, str(script), *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_job_env(env), timeout=60)
    assert out.returncode == 0, f"sbatch failed: {out.stderr.strip()}"
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    """SLURM's state for the job (scontrol, else the jobcomp log of slurm/local), or UNKNOWN."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20
    )
    match = re.search(r"JobState=(\S+)", out.stdout)
    if match:
        return match.group(1)
    jobcomp = Path("/var/log/slurm/jobcomp.log")
    if jobcomp.is_file():
        states = re.findall(rf"JobId={job_id} .*?JobState=(\S+)", jobcomp.read_text())
        if states:
            return states[-1]
    return "UNKNOWN"


def in_queue(job_id: str) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20
    )
    return out.returncode == 0 and bool(out.stdout.strip())


def output_of(workdir: Path, job_id: str) -> str:
    path = workdir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def wait_for(job_id: str, workdir: Path, timeout_s: float) -> str:
    """Poll until the job leaves the queue; return its final state. Cancels it on timeout."""
    deadline = time.monotonic() + timeout_s
    while in_queue(job_id):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=20)
            tail = output_of(workdir, job_id)[-3000:]
            pytest.fail(f"job {job_id} still in the queue after {timeout_s:.0f}s; cancelled. Output:\n{tail}")
        time.sleep(1)
    return job_state(job_id)


def _assert_completed(state: str, job_id: str, workdir: Path) -> str:
    out = output_of(workdir, job_id)
    assert state == "COMPLETED", f"job {job_id} ended {state}; output:\n{out[-4000:]}"
    return out


# ------------------------------------------------------------------------------------ tests
def test_sbatch_runs_two_ranks(cluster: None, tmp_path: Path) -> None:
    """train.sbatch starts 2 ranks with srun that meet at MASTER_ADDR:MASTER_PORT."""
    job_id = submit(
        ["probe.yaml", "trainer.max_steps=3", "name=two words"],
        tmp_path,
        env={"MMDIFF_CMD": f"{sys.executable} {PROBE}"},
    )
    out = _assert_completed(wait_for(job_id, tmp_path, timeout_s=180), job_id, tmp_path)
    probes = sorted(re.findall(r"^PROBE (.*)$", out, flags=re.M))
    assert len(probes) == 2, f"expected 2 ranks, got:\n{out}"
    fields = [dict(kv.split("=", 1) for kv in p.split(" args=")[0].split()) for p in probes]
    assert sorted(f["rank"] for f in fields) == ["0", "1"]
    for f in fields:
        # world size from SLURM, from mmdiff.run.cluster.slurm_allocation, and a real all-reduce
        assert f["world"] == "2" and f["alloc_world"] == "2" and f["tasks_per_node"] == "2"
        assert f["sum"] == "3", "ranks did not meet at MASTER_ADDR:MASTER_PORT"
    # CONFIG and overrides reach the command unchanged, spaces included.
    assert all(p.endswith("args=probe.yaml trainer.max_steps=3 name=two words") for p in probes)
    assert f"job {job_id} restart 0" in out


def _fit_overrides(run_dir: Path, shards: Path, max_steps: int) -> List[str]:
    return [
        f"run_dir={run_dir}",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/val-*.tar",
        "data.batch_size=8",
        "data.val_batch_size=8",
        "data.num_workers=0",
        f"data.steps_per_epoch={max_steps}",
        "model.vae.pretrained=null",
        "model.clip.pretrained=null",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_every_n_steps={max_steps}",
        "trainer.limit_val_batches=1",
        f"trainer.checkpoint_every_n_steps={max(1, max_steps // 2)}",
        "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
        "sampling.every_n_steps=100000",
        "sampling.steps=2",
        "logger.kind=wandb",
        "logger.mode=offline",
    ]


def _global_step(ckpt: Path) -> int:
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def test_sbatch_fit_two_ranks(cluster: None, tmp_path: Path, demo_shards: Path) -> None:
    """`mmdiff fit` under train.sbatch: DDP over 2 ranks, one run dir, W&B only from rank 0."""
    run_dir = tmp_path / "run"
    max_steps = 30
    job_id = submit(
        [str(REPO / "configs" / "demo" / "text_to_image.yaml"), *_fit_overrides(run_dir, demo_shards, max_steps)],
        tmp_path,
        env={"WANDB_SILENT": "true"},
        sbatch_opts=["--time=20"],
    )
    out = _assert_completed(wait_for(job_id, tmp_path, timeout_s=900), job_id, tmp_path)

    # Both ranks joined one DDP world and trained to the end (rank 1 missing would hang rank 0).
    assert "rank 0/2: training shards" in out and "rank 1/2: training shards" in out, out[-4000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), out[-4000:]
    assert _global_step(last) == max_steps
    import torch

    positions = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]["DataPosition"]["ranks"]
    assert [(p["rank"], p["world"]) for p in positions] == [(0, 2), (1, 2)]  # both ranks saved

    # One checkpoint directory, written once (not once per rank), and no stray Lightning dirs.
    ckpt_dirs = sorted(p for p in tmp_path.rglob("checkpoints") if p.is_dir())
    assert ckpt_dirs == [run_dir / "checkpoints"]
    assert not list(tmp_path.rglob("lightning_logs"))
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt")), "no requeue happened, so no hpc checkpoint"

    # W&B: one offline run, from rank 0, whose id is the one kept in the run dir.
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(runs) == 1, runs
    assert runs[0].endswith(f"-{run_id}")


def _logged_losses(run_dir: Path) -> List[Dict[int, float]]:
    """{global step: train/loss} of each start of the job (one W&B offline run folder per start)."""
    sys.path.insert(0, str(REPO / "tests"))
    from wandb_offline import read_run

    starts = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):  # named by start time
        rows = read_run(folder)["history"]
        starts.append({int(r["trainer/global_step"]): float(r["train/loss"]) for r in rows if "train/loss" in r})
    return starts


def test_sbatch_fit_requeue_resumes_from_hpc_checkpoint(
    cluster: None, tmp_path: Path, demo_shards: Path
) -> None:
    """SIGUSR1 (what --signal=SIGUSR1@90 sends) → hpc_ckpt_1.ckpt, requeue, resume, finish.

    mmdiff handles the signal itself (mmdiff.callbacks.requeue): all ranks save the checkpoint at
    a step boundary, rank 0 requeues, and all leave the fit. So the logged global steps of the
    two starts join without a gap or a repeat: the first start logs 0..s-1 and stops, the
    requeued one logs s..max_steps-1 (Lightning's own handler saves mid-step, and a resume from
    such a checkpoint re-runs that step and logs from s+1: a gap).
    """
    run_dir = tmp_path / "run"
    max_steps = 40
    overrides = _fit_overrides(run_dir, demo_shards, max_steps)
    overrides = [o for o in overrides
                 if not o.startswith(("trainer.checkpoint_every_n_steps", "trainer.log_every_n_steps"))]
    job_id = submit(
        [str(REPO / "configs" / "demo" / "text_to_image.yaml"), *overrides,
         "trainer.checkpoint_every_n_steps=10", "trainer.log_every_n_steps=1", "data.steps_per_epoch=7"],
        tmp_path,
        env={"WANDB_SILENT": "true"},
        sbatch_opts=["--time=20"],
    )
    # Signal once training is under way (the first periodic checkpoint is written at step 10).
    deadline = time.monotonic() + 600
    while not list((run_dir / "checkpoints").glob("step*.ckpt")):
        if not in_queue(job_id) or time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=20)
            pytest.fail(f"job {job_id} never reached step 10; output:\n{output_of(tmp_path, job_id)[-4000:]}")
        time.sleep(1)
    time.sleep(3)  # a few steps past the periodic checkpoint, so the hpc checkpoint is mid-epoch
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=20)

    out = _assert_completed(wait_for(job_id, tmp_path, timeout_s=900), job_id, tmp_path)
    assert f"job {job_id} restart 1" in out, "the job was not requeued"
    assert re.search(rf"requeue: saved step \d+ and requeued job {job_id} ", out), out[-4000:]
    assert re.search(r"resuming \S+ from \S*/hpc_ckpt_1\.ckpt \(step \d+\)", out), "did not resume from hpc_ckpt_1.ckpt"
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == max_steps
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt")), "a finished run keeps no stale requeue checkpoint"
    # The requeued job reads the run id kept in the run dir, so W&B resumes the same run (one
    # offline dir per start).
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs

    first, second = _logged_losses(run_dir)
    resumed_at = min(second)
    assert 10 <= resumed_at < max_steps, resumed_at
    # no gap, no repeat: every step logged exactly once over the two starts
    assert sorted(first) == list(range(resumed_at)), (sorted(first), resumed_at)
    assert sorted(second) == list(range(resumed_at, max_steps)), sorted(second)
