"""Two ranks of one job start `mmdiff fit` in a run dir that holds a run: they decide alike
(resume or --fresh), and only rank 0 moves the earlier run aside (tests/scale/resume_worker.py)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import pytest
import torch
import yaml

from conftest import HERE, clean_env, free_port
from multiproc import run_all
from mmdiff.cli import main

from tiny_configs import toy_config


def _two_ranks(config: Path, logs: Path, rank0_delay: float, *args: str) -> List[str]:
    port = str(free_port())
    return run_all([[sys.executable, str(HERE / "resume_worker.py"), str(config), str(r), "2", port,
                     str(rank0_delay if r == 0 else 0), *args] for r in range(2)], logs, clean_env(), timeout=300)


def _files(run_dir: Path) -> dict:
    paths = [*run_dir.glob("checkpoints/*.ckpt"), run_dir / "config.yaml"]
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in paths if p.is_file()}


@pytest.mark.slow
def test_two_ranks_resume_alike_and_rank_zero_alone_moves_for_fresh(tmp_path: Path, digits16: Path) -> None:
    config = toy_config(tmp_path, digits16, trainer={"max_steps": 3, "val_every_n_steps": 100, "keep_last_n": -1})
    run = tmp_path / "run"
    assert main(["fit", str(config), "optim.lr=0.01"]) == 0
    earlier = _files(run)

    # Rank 1 reaches the run dir seconds before rank 0: it must not write into the earlier run.
    _two_ranks(config, tmp_path / "fresh", 4.0, "--fresh")
    [moved] = (run / "superseded").iterdir()
    assert _files(moved) == earlier  # config.yaml included: rank 1 wrote none before rank 0 moved it
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] != 0.01
    fresh = _files(run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3

    # Both ranks resume from step 3 (one rank at step 0 would train other steps: a hang or an error).
    logs = _two_ranks(config, tmp_path / "rerun", 0.0, "trainer.max_steps=6")
    assert f"resuming {run} from " in logs[0] and "(step 3)" in logs[0]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert _files(run)["checkpoints/step0000003.ckpt"] == fresh["checkpoints/step0000003.ckpt"]
    assert len(list((run / "superseded").iterdir())) == 1
