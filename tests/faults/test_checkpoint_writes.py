"""Checkpoint writes are atomic: a kill mid-save or a full disk keeps the previous checkpoint;
``trainer.keep_last_n`` is honoured; every strategy writes through :class:`AtomicCheckpointIO`."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdiff.io.atomic import atomic_torch_save
from mmdiff.run.checkpoint_io import AtomicCheckpointIO
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.errors import CheckpointError
from mmdiff.run.training import build_system, build_trainer
from numerics_kit import toy_config

pytestmark = pytest.mark.faults

WRITER = Path(__file__).with_name("ckpt_writer.py")
REPO = Path(__file__).resolve().parents[2]


def _writer(mode: str, path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WRITER), mode, str(path)], stdout=subprocess.PIPE,
                            text=True, env=env)


def _name(path: Path) -> str:
    return torch.load(path, weights_only=True)["name"]


@pytest.mark.slow  # starts a Python process that imports torch
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    proc = _writer("block", target)
    try:
        line = proc.stdout.readline().split()  # blocks until B's write is half done
        assert line[0] == "HALF", line
        partial = Path(line[1])
        assert partial.parent == tmp_path and partial.stat().st_size >= 2 * 2**20
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _name(target) == "A"  # the previous checkpoint, whole and loadable
    atomic_torch_save({"name": "C"}, target)  # the next save clears the torn temporary file
    assert _name(target) == "C" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """In-process companion of the SIGKILL test: the write stops half-way on an exception; the
    target is still the previous checkpoint and the temporary file is gone."""
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"name": "A"}, target)
    real_save = torch.save

    def half_then_interrupt(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"name": "B", "w": torch.zeros(1000)}, target)
    assert _name(target) == "A" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _check_failed_write(proc: subprocess.Popen, target: Path, reason: str) -> None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cannot write checkpoint '{target}': {reason}; ")
    assert "the previous checkpoint there is kept" in lines[0]
    assert _name(target) == "A"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary left


@pytest.mark.slow  # starts a Python process that imports torch
def test_file_size_limit_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    _check_failed_write(_writer("fsize", target), target, "the file is larger than the system allows")


@pytest.mark.slow  # starts a Python process that imports torch
def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root); the RLIMIT_FSIZE test covers the path")
    try:
        target = disk / "last.ckpt"
        _check_failed_write(_writer("plain", target), target, "the disk is full")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_during_fit_is_one_line_and_keeps_last(tmp_path: Path, demo_shards: Path,
                                                          monkeypatch, capsys) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step0000006" in str(getattr(f, "name", f)):
            real_save(obj, f, *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["fit", str(toy_config(tmp_path, demo_shards))]) == 1
    err = capsys.readouterr().err
    folder = tmp_path / "run" / "checkpoints"
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: cannot write checkpoint '{folder / 'step0000006.ckpt'}': the disk is full; "
                   "nothing was written. Free space (or lower trainer.keep_last_n) and resume with "
                   "--resume last."]
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step0000003.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("keep, expected", [
    (2, ["last.ckpt", "step0000005.ckpt", "step0000006.ckpt"]),
    (0, ["last.ckpt"]),
    (-1, ["last.ckpt"] + [f"step000000{i}.ckpt" for i in range(1, 7)]),
])
def test_keep_last_n_is_honoured(tmp_path: Path, demo_shards: Path, keep: int, expected) -> None:
    cfg = toy_config(tmp_path, demo_shards, trainer={"checkpoint_every_n_steps": 1, "keep_last_n": keep})
    assert main(["fit", str(cfg)]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == expected


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp"])
def test_every_strategy_writes_atomically(tmp_path: Path, demo_shards: Path, strategy: str,
                                          monkeypatch) -> None:
    """Periodic, last and SLURM requeue (``hpc_ckpt_N``) saves all go through trainer.save_checkpoint
    → strategy.checkpoint_io, which build_trainer makes an AtomicCheckpointIO for every strategy."""
    overrides = [f"trainer.strategy={strategy}", "logger.kind=none"]
    cfg = load_config(toy_config(tmp_path, demo_shards), overrides)
    system = build_system(cfg)
    trainer = build_trainer(cfg, tmp_path, [], [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    if strategy == "auto":
        written = []
        monkeypatch.setattr("mmdiff.io.atomic.atomic_torch_save", lambda obj, p: written.append(p))
        trainer.strategy.connect(system)
        trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(str(tmp_path)))
        assert [Path(p).name for p in written] == ["hpc_ckpt_1.ckpt"]


def test_refuses_storage_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})


def test_unwritable_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        atomic_torch_save({"a": 1}, blocker / "x.ckpt" / "y.ckpt")
