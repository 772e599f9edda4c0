"""mmdiff.run.cluster: SLURM allocation from environment variables, trainer overrides, requeue files."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmdiff.run.cluster import (
    apply_slurm_allocation,
    hpc_checkpoint,
    parse_tasks_per_node,
    prune_hpc_checkpoints,
    slurm_allocation,
    slurm_run_dir,
)
from mmdiff.config import schema
from mmdiff.errors import ConfigError

# What `sbatch --nodes=3 --ntasks-per-node=2` exports to every rank of its `srun` step.
SRUN_3x2 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train.sbatch",
    "SLURM_NNODES": "3",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_NTASKS": "6",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2(x3)",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
}


@pytest.fixture
def slurm_env(monkeypatch: pytest.MonkeyPatch):
    """Clear every SLURM_* variable, then set the given ones in os.environ."""
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)

    def set_env(values: dict) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def _cfg(**trainer):
    cfg = schema()
    cfg.run_dir = "runs/x"
    for key, value in trainer.items():
        cfg.trainer[key] = value
    return cfg


# ------------------------------------------------------------------------ parse / allocation
@pytest.mark.parametrize(
    "value, expected",
    [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1]), ("8,8", [8, 8])],
)
def test_parse_tasks_per_node(value: str, expected: list) -> None:
    assert parse_tasks_per_node(value) == expected


def test_parse_tasks_per_node_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_tasks_per_node("two")


def test_no_allocation_outside_slurm(slurm_env) -> None:
    slurm_env({})
    assert slurm_allocation() is None


def test_allocation_from_srun_step(slurm_env) -> None:
    slurm_env(SRUN_3x2)
    assert slurm_allocation() == {"job_id": "4242", "num_nodes": 3, "tasks_per_node": 2, "world_size": 6}


def test_allocation_from_explicit_mapping_ignores_os_environ(slurm_env) -> None:
    slurm_env(SRUN_3x2)
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "x"}
    assert slurm_allocation(env) == {"job_id": "7", "num_nodes": 1, "tasks_per_node": 1, "world_size": 1}


def test_allocation_compressed_tasks_per_node_only(slurm_env) -> None:
    env = dict(SRUN_3x2)
    del env["SLURM_NTASKS_PER_NODE"]
    del env["SLURM_NNODES"]
    slurm_env(env)
    alloc = slurm_allocation()
    assert alloc is not None
    assert (alloc["num_nodes"], alloc["tasks_per_node"], alloc["world_size"]) == (3, 2, 6)


def test_allocation_ntasks_per_node_in_compressed_form(slurm_env) -> None:
    slurm_env({**SRUN_3x2, "SLURM_NTASKS_PER_NODE": "2(x3)"})
    alloc = slurm_allocation()
    assert alloc is not None and alloc["tasks_per_node"] == 2


def test_allocation_without_tasks_per_node_divides_world_size(slurm_env) -> None:
    slurm_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NAME": "t"})
    assert slurm_allocation() == {"job_id": "1", "num_nodes": 2, "tasks_per_node": 4, "world_size": 8}


@pytest.mark.parametrize("name", ["bash", "interactive"])
def test_interactive_jobs_are_not_slurm_runs(slurm_env, name: str) -> None:
    # Lightning does not use its SLURM environment for these either (you launch ranks yourself).
    slurm_env({**SRUN_3x2, "SLURM_JOB_NAME": name})
    assert slurm_allocation() is None


def test_batch_step_without_task_options_is_not_a_slurm_run(slurm_env) -> None:
    # `sbatch --wrap python ...` without --ntasks*: no SLURM_NTASKS, Lightning runs single-process.
    slurm_env({"SLURM_JOB_ID": "3", "SLURM_NNODES": "1", "SLURM_TASKS_PER_NODE": "1"})
    assert slurm_allocation() is None


def test_uneven_tasks_per_node_is_a_clear_error(slurm_env) -> None:
    env = {k: v for k, v in SRUN_3x2.items() if k != "SLURM_NTASKS_PER_NODE"}
    slurm_env({**env, "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_NTASKS": "5"})
    with pytest.raises(ConfigError, match="ntasks-per-node"):
        slurm_allocation()


def test_ntasks_that_do_not_fill_nodes_is_a_clear_error(slurm_env) -> None:
    slurm_env({**SRUN_3x2, "SLURM_NTASKS": "5"})
    with pytest.raises(ConfigError, match="--nodes=N --ntasks-per-node=M"):
        slurm_allocation()


# ------------------------------------------------------------------------ apply to config
def test_apply_outside_slurm_returns_config_unchanged(slurm_env) -> None:
    slurm_env({})
    cfg = _cfg(devices="1", num_nodes=1)
    assert apply_slurm_allocation(cfg) is cfg


def test_apply_sets_devices_and_nodes_and_warns_on_override(slurm_env, caplog) -> None:
    slurm_env(SRUN_3x2)
    cfg = _cfg(devices="1", num_nodes=1)
    with caplog.at_level(logging.INFO, logger="mmdiff.run.cluster"):
        out = apply_slurm_allocation(cfg)
    assert out.trainer.devices == "2" and out.trainer.num_nodes == 3
    assert cfg.trainer.devices == "1" and cfg.trainer.num_nodes == 1, "input must not change"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("trainer.devices=1" in m for m in warnings)
    assert any("trainer.num_nodes=1" in m for m in warnings)
    # The result still validates against the typed schema (devices is a string there).
    OmegaConf.merge(schema(), out)


def test_apply_is_quiet_when_config_agrees_or_says_auto(slurm_env, caplog) -> None:
    slurm_env(SRUN_3x2)
    for devices in ("auto", "2"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmdiff.run.cluster"):
            out = apply_slurm_allocation(_cfg(devices=devices, num_nodes=3))
        assert out.trainer.devices == "2" and out.trainer.num_nodes == 3
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------ run dir
def test_run_dir_is_unchanged_by_default(slurm_env) -> None:
    slurm_env(SRUN_3x2)
    assert slurm_run_dir(_cfg()) == Path("runs/x")


def test_run_dir_per_job(slurm_env) -> None:
    slurm_env(SRUN_3x2)
    assert slurm_run_dir(_cfg(), per_job=True) == Path("runs/x/slurm-4242")
    slurm_env({"SLURM_JOB_NAME": "bash"})
    assert slurm_run_dir(_cfg(), per_job=True) == Path("runs/x")


def test_run_dir_per_job_outside_slurm(slurm_env) -> None:
    slurm_env({})
    assert slurm_run_dir(_cfg(), per_job=True) == Path("runs/x")


# --------------------------------------------------------------------- hpc checkpoints
def _touch(path: Path, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_hpc_checkpoint_none_when_missing(tmp_path: Path) -> None:
    assert hpc_checkpoint(tmp_path / "nope") is None
    assert hpc_checkpoint(tmp_path) is None


def test_hpc_checkpoint_picks_highest_number_not_lexical(tmp_path: Path) -> None:
    for n in (1, 2, 10):
        _touch(tmp_path / f"hpc_ckpt_{n}.ckpt")
    _touch(tmp_path / "hpc_ckpt_99.ckpt.tmp")  # not a finished checkpoint
    _touch(tmp_path / "checkpoints" / "hpc_ckpt_50.ckpt")  # only default_root_dir counts
    assert hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"


def test_hpc_checkpoint_matches_lightning_naming(tmp_path: Path) -> None:
    """The file Lightning's requeue handler would write next is the one we find."""
    pytest.importorskip("lightning")
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    first = Path(_CheckpointConnector.hpc_save_path(str(tmp_path)))
    _touch(first)
    second = Path(_CheckpointConnector.hpc_save_path(str(tmp_path)))
    _touch(second)
    assert (first.name, second.name) == ("hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt")
    assert hpc_checkpoint(tmp_path) == second


def test_prune_keeps_newest(tmp_path: Path) -> None:
    for n in (1, 2, 3):
        _touch(tmp_path / f"hpc_ckpt_{n}.ckpt")
    removed = prune_hpc_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    assert [p.name for p in tmp_path.iterdir()] == ["hpc_ckpt_3.ckpt"]
    assert prune_hpc_checkpoints(tmp_path, keep=1) == []


def test_prune_keep_zero_and_missing_dir(tmp_path: Path) -> None:
    _touch(tmp_path / "hpc_ckpt_1.ckpt")
    _touch(tmp_path / "last.ckpt")
    assert [p.name for p in prune_hpc_checkpoints(tmp_path, keep=0)] == ["hpc_ckpt_1.ckpt"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert prune_hpc_checkpoints(tmp_path / "nope") == []
    with pytest.raises(ValueError):
        prune_hpc_checkpoints(tmp_path, keep=-1)
