"""mmdiff.run.resume: which checkpoint a start of `mmdiff fit` continues from, and --fresh's move."""
from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from mmdiff.config import schema, to_container
from mmdiff.errors import CheckpointError
from mmdiff.run.resume import (
    RESUME_KEYS,
    Start,
    is_global_rank_zero,
    newest_complete_checkpoint,
    plan_start,
    restart_count,
    supersede_run,
)

FIRST_START: dict = {}
# What the second start of a requeued `srun` step sees (rank 0 of 2).
REQUEUED = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "1"}


def _ckpt(path: Path, step: int, mtime: float | None = None, drop: tuple = ()) -> Path:
    """A checkpoint as Lightning writes it (the keys a resume reads), at global step ``step``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": {"w": torch.zeros(2)}, "optimizer_states": [{}], "lr_schedulers": [],
                  "loops": {}, "global_step": step, "epoch": 0,
                  "hyper_parameters": {"config": to_container(schema())}}
    torch.save({k: v for k, v in checkpoint.items() if k not in drop}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.mark.parametrize("newest", ["checkpoints/last.ckpt", "checkpoints/step0000004.ckpt", "hpc_ckpt_1.ckpt"])
def test_newest_complete_is_the_highest_step_of_any_kind(tmp_path: Path, newest: str) -> None:
    """Step, not file kind or modification time, decides: the file with the highest step wins
    even when another file is younger."""
    now = 1_700_000_000.0
    kinds = ["checkpoints/last.ckpt", "checkpoints/step0000004.ckpt", "hpc_ckpt_1.ckpt"]
    for i, name in enumerate(kinds):
        _ckpt(tmp_path / name, 9 if name == newest else 3 + i, mtime=now - (100 if name == newest else i))
    assert plan_start(tmp_path, env=FIRST_START) == Start(tmp_path / newest, 9)
    assert plan_start(tmp_path, "last", env=FIRST_START) == Start(tmp_path / newest, 9)


def test_same_step_goes_to_the_younger_file(tmp_path: Path) -> None:
    """A requeue checkpoint written right after the periodic one at the same step is the newer."""
    _ckpt(tmp_path / "checkpoints" / "step0000004.ckpt", 4, mtime=1000.0)
    _ckpt(tmp_path / "checkpoints" / "last.ckpt", 4, mtime=1000.0)
    hpc = _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 4, mtime=1001.0)
    assert newest_complete_checkpoint(tmp_path) == (hpc, 4)


@pytest.mark.parametrize("damage", ["truncated", "empty", "weights only"])
def test_incomplete_newest_is_skipped_with_a_warning(tmp_path: Path, damage: str, caplog) -> None:
    older = _ckpt(tmp_path / "checkpoints" / "step0000004.ckpt", 4)
    newest = _ckpt(tmp_path / "hpc_ckpt_2.ckpt", 8, drop=("optimizer_states",) if damage == "weights only" else ())
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "empty":
        newest.write_bytes(b"")
    _ckpt(tmp_path / "checkpoints" / "step0000002.ckpt.tmp-host-1-abc", 6)  # a killed writer's temp file
    with caplog.at_level(logging.WARNING, logger="mmdiff.run.resume"):
        assert plan_start(tmp_path, env=FIRST_START) == Start(older, 4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"skipping checkpoint {newest}: ")
    assert "\n" not in warnings[0]


def test_no_checkpoints_start_at_step_zero(tmp_path: Path, caplog) -> None:
    (tmp_path / "config.yaml").write_text("x: 1\n")
    assert plan_start(tmp_path, env=FIRST_START) == Start()
    assert plan_start(tmp_path / "missing", env=FIRST_START) == Start()
    with caplog.at_level(logging.WARNING, logger="mmdiff.run.resume"):
        assert plan_start(tmp_path, "last", env=FIRST_START) == Start()
    assert "no complete checkpoint in" in caplog.text


def test_resume_logs_one_line_naming_run_file_and_step(tmp_path: Path, caplog) -> None:
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt", 5)
    with caplog.at_level(logging.INFO, logger="mmdiff.run.resume"):
        plan_start(tmp_path, env=FIRST_START)
    assert [r.getMessage() for r in caplog.records] == [f"resuming {tmp_path} from {last} (step 5)"]


def test_explicit_path_wins_and_must_be_complete(tmp_path: Path) -> None:
    _ckpt(tmp_path / "checkpoints" / "last.ckpt", 8)
    old = _ckpt(tmp_path / "elsewhere" / "old.ckpt", 2)
    assert plan_start(tmp_path, str(old), env=FIRST_START) == Start(old, 2)
    weights_only = _ckpt(tmp_path / "elsewhere" / "weights.ckpt", 2, drop=("optimizer_states", "loops"))
    with pytest.raises(CheckpointError, match="has no optimizer_states, loops"):
        plan_start(tmp_path, str(weights_only), env=FIRST_START)
    with pytest.raises(CheckpointError, match="does not exist"):
        plan_start(tmp_path, str(tmp_path / "nowhere.ckpt"), env=FIRST_START)


def test_requeued_job_continues_past_its_command_lines_path(tmp_path: Path) -> None:
    """A requeue reruns the original command line (``--resume PATH``, ``--fresh``): the run's
    progress since then wins."""
    newer = _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 8)
    old = _ckpt(tmp_path / "elsewhere" / "old.ckpt", 2)
    assert plan_start(tmp_path, str(old), env=REQUEUED) == Start(newer, 8)
    assert plan_start(tmp_path, fresh=True, env=REQUEUED) == Start(newer, 8)
    assert (tmp_path / "hpc_ckpt_1.ckpt").is_file() and not (tmp_path / "superseded").exists()
    further = _ckpt(tmp_path / "elsewhere" / "further.ckpt", 12)
    assert plan_start(tmp_path, str(further), env=REQUEUED) == Start(further, 12)


def _earlier_run(run_dir: Path) -> dict:
    files = {
        "checkpoints/last.ckpt": _ckpt(run_dir / "checkpoints" / "last.ckpt", 6),
        "checkpoints/step0000003.ckpt": _ckpt(run_dir / "checkpoints" / "step0000003.ckpt", 3),
        "hpc_ckpt_1.ckpt": _ckpt(run_dir / "hpc_ckpt_1.ckpt", 5),
        "samples/train_step0000003.png": run_dir / "samples" / "train_step0000003.png",
    }
    files["samples/train_step0000003.png"].parent.mkdir(parents=True)
    files["samples/train_step0000003.png"].write_bytes(b"png")
    (run_dir / "config.yaml").write_text("name: old\n")
    (run_dir / "wandb_run_id").write_text("oldid\n")
    return {name: path.read_bytes() for name, path in files.items()}


def test_fresh_moves_the_earlier_run_aside_on_rank_zero(tmp_path: Path, caplog) -> None:
    before = _earlier_run(tmp_path)
    (tmp_path / "wandb" / "offline-run-20261202_140000-oldid").mkdir(parents=True)  # W&B reads the id back from it
    (tmp_path / "notes.txt").write_text("not the run's")
    with caplog.at_level(logging.INFO, logger="mmdiff.run.resume"):
        assert plan_start(tmp_path, fresh=True, env=FIRST_START) == Start()
    [moved] = (tmp_path / "superseded").iterdir()
    assert datetime.strptime(moved.name, "%Y%m%dT%H%M%SZ")
    assert {name: (moved / name).read_bytes() for name in before} == before  # byte for byte
    assert (moved / "wandb_run_id").read_text() == "oldid\n" and (moved / "config.yaml").is_file()
    assert (moved / "wandb" / "offline-run-20261202_140000-oldid").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "superseded"]
    assert f"to {moved}" in caplog.text
    assert newest_complete_checkpoint(tmp_path) is None


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"LOCAL_RANK": "1"}, {"NODE_RANK": "1"},
                                 {**REQUEUED, "SLURM_PROCID": "1", "SLURM_RESTART_COUNT": "0"}])
def test_fresh_on_other_ranks_moves_nothing(tmp_path: Path, env: dict) -> None:
    before = _earlier_run(tmp_path)
    assert plan_start(tmp_path, fresh=True, env=env) == Start()
    assert not (tmp_path / "superseded").exists()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_two_fresh_starts_in_one_second_keep_both(tmp_path: Path) -> None:
    now = datetime(2026, 12, 2, 14, 0, 0, tzinfo=timezone.utc)
    (tmp_path / "config.yaml").write_text("one")
    first = supersede_run(tmp_path, now=now)
    (tmp_path / "config.yaml").write_text("two")
    second = supersede_run(tmp_path, now=now)
    assert (first.name, second.name) == ("20261202T140000Z", "20261202T140000Z-1")
    assert [(d / "config.yaml").read_text() for d in (first, second)] == ["one", "two"]
    assert supersede_run(tmp_path, now=now) is None  # nothing left to move


@pytest.mark.parametrize("env, zero", [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "3"}, True), ({"RANK": "2"}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1"}, False),
    (REQUEUED, True), ({**REQUEUED, "SLURM_PROCID": "1"}, False),
    # an interactive allocation is not a SLURM-managed run: Lightning's launcher decides
    ({**REQUEUED, "SLURM_PROCID": "1", "SLURM_JOB_NAME": "bash"}, True),
])
def test_global_rank_zero_from_environment(env: dict, zero: bool) -> None:
    assert is_global_rank_zero(env) is zero


def test_restart_count() -> None:
    assert restart_count({}) == 0
    assert restart_count({"SLURM_RESTART_COUNT": "2"}) == 2
    assert restart_count({"TORCHELASTIC_RESTART_COUNT": "1", "SLURM_RESTART_COUNT": "0"}) == 1


def test_resume_keys_are_what_lightning_writes(tmp_path: Path) -> None:
    """RESUME_KEYS must stay a subset of a real Lightning training checkpoint's keys."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.ones(2, 2)))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    assert set(RESUME_KEYS) <= set(torch.load(tmp_path / "c.ckpt", weights_only=True))
