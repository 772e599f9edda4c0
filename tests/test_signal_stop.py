"""Stopping on a signal (mmdiff.callbacks.requeue.RequeueOnSignal), one process, no SLURM cluster:
SIGUSR1 saves at an optimiser-step boundary, requeues (a fake ``scontrol``) and leaves the fit
before any end-of-fit work; SIGTERM saves and exits 143; one ``hpc_ckpt`` stays on disk."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import lightning as L
import pytest
import torch

from mmdiff.cli import main

from tiny_configs import add_fit_callback, toy_config


@pytest.fixture
def accumulating_config(tmp_path: Path, demo_shards: Path) -> Path:
    """Toy run: 2 batches per optimiser step, validation due after every step."""
    return toy_config(tmp_path, demo_shards, trainer={"accumulate_grad_batches": 2, "val_every_n_steps": 1})


class SignalMidWindow(L.Callback):
    """Sends ``signum`` to this process at the end of training batch ``batch``; records what runs after."""

    def __init__(self, signum: int, batch: int) -> None:
        self.signum, self.batch = signum, batch
        self.sent = False
        self.after: List[Tuple[str, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sent:
            self.after.append(("train_batch_end", trainer.global_step))
        elif trainer.fit_loop.total_batch_idx == self.batch:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_validation_start(self, trainer, pl_module):
        if self.sent:
            self.after.append(("validation", trainer.global_step))

    def on_train_end(self, trainer, pl_module):
        self.after.append(("train_end", trainer.global_step))


def _fit_with(callback: L.Callback, monkeypatch: pytest.MonkeyPatch, args: List[str]) -> int:
    add_fit_callback(monkeypatch, callback)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return main(["fit", *args])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def _fake_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A one-task SLURM job (Lightning's detection) with an ``scontrol`` that records its arguments."""
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "toy", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
                       "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_sigusr1_saves_at_the_step_boundary_requeues_and_skips_the_end_of_fit(
        accumulating_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    calls = _fake_slurm(monkeypatch, tmp_path)
    run = tmp_path / "run"
    spy = SignalMidWindow(signal.SIGUSR1, batch=2)  # the first batch of step 2's window
    with caplog.at_level("INFO", logger="mmdiff"):
        assert _fit_with(spy, monkeypatch, [str(accumulating_config)]) == 0
    # Saved once step 2's window was complete, not at step 1 (mid-window: partial gradients lost).
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert _step(run / "hpc_ckpt_1.ckpt") == 2
    # Nothing after the save: no validation (due after every step), no train end, no last.ckpt.
    assert spy.after == [("train_batch_end", 2)]
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert calls.read_text().split() == ["requeue", "4242"]
    # The saved step's metrics reached the logger (Lightning logs step 2 as row 1) before the stop.
    rows = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    logged = sorted({int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:]
                     if r.split(",")[rows[0].split(",").index("train/loss")]})
    assert logged == [0, 1], rows
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("requeue: saved step 2")]
    assert len(lines) == 1 and "requeued job 4242" in lines[0] and "s after SIGUSR1" in lines[0], lines
    # The run's last line says why it stopped and where it continues from, not that it is done.
    last = [r.getMessage() for r in caplog.records if r.name == "mmdiff.run.training"][-1]
    assert last == (f"stopped by SIGUSR1 after step 2 for a requeue, saved in {run / 'hpc_ckpt_1.ckpt'}; "
                    "the next start of this run continues from it")


def test_sigterm_saves_at_the_step_boundary_exits_143_and_keeps_one_requeue_checkpoint(
        accumulating_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"an older requeue checkpoint")
    spy = SignalMidWindow(signal.SIGTERM, batch=2)
    assert _fit_with(spy, monkeypatch, [str(accumulating_config)]) == 143
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_2.ckpt"]
    assert _step(run / "hpc_ckpt_2.ckpt") == 2
    assert spy.after == [("train_batch_end", 2)]
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 2, saved in" in err and "hpc_ckpt_2.ckpt" in err


def test_sigterm_without_save_stops_as_lightning_does(accumulating_config: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spy = SignalMidWindow(signal.SIGTERM, batch=2)
    assert _fit_with(spy, monkeypatch, [str(accumulating_config), "trainer.sigterm_save=false"]) == 143
    assert not list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))


def _job_env() -> dict:
    """This environment without cluster or launcher variables (a SLURM allocation must not leak in)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tests = str(Path(__file__).resolve().parent)
    env.update(PYTHONPATH=os.pathsep.join([str(Path(tests).parent), tests]), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return env


#: `mmdiff fit` in a process of its own, with the toy system registered.
_FIT = "import sys, tiny_configs; from mmdiff.cli import main; sys.exit(main(['fit', *sys.argv[1:]]))"


def test_sigterm_to_the_whole_process_group_saves_despite_loader_workers(
        accumulating_config: Path, tmp_path: Path, caplog) -> None:
    """SLURM's scancel / preemption (and ``kill -TERM -PGID``) signal the loader workers too: they must
    live on until the main process has saved at the step boundary."""
    run, log = tmp_path / "run", tmp_path / "fit.log"
    args = [str(accumulating_config), "data.num_workers=2", "trainer.max_steps=100000",
            "trainer.accumulate_grad_batches=1", "trainer.val_every_n_steps=100000",
            "trainer.checkpoint_every_n_steps=100000"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _FIT, *args], env=_job_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a timing
        while "step 3/100000" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step 3 after 300 s:\n" + log.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and both workers
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert "killed by signal" not in output, output[-3000:]
    saved = list(run.glob("hpc_ckpt_*.ckpt"))
    assert len(saved) == 1, output[-3000:]
    step = _step(saved[0])
    assert step >= 3 and f"stopped by SIGTERM after step {step}, saved in {saved[0]}" in output
    # The next start continues from it.
    with caplog.at_level("INFO", logger="mmdiff.run.resume"):
        assert main(["fit", *args[:2], f"trainer.max_steps={step + 2}", *args[3:]]) == 0
    assert f"from {saved[0]} (step {step})" in caplog.text
    assert _step(run / "checkpoints" / "last.ckpt") == step + 2
