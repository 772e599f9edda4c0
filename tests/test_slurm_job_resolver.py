"""``${slurm_job:}``: run directories keyed by the SLURM job (mmdiff.config.resolvers)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmdiff.config import load_config
from mmdiff.config.resolvers import slurm_job_key
from mmdiff.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "text_to_image.yaml"


@pytest.mark.parametrize("env, expected", [
    ({}, "local"),
    ({"SLURM_JOB_ID": "812"}, "812"),
    # an array task: SLURM's %A_%a, not the task's own job id (which differs per task)
    ({"SLURM_JOB_ID": "815", "SLURM_ARRAY_JOB_ID": "812", "SLURM_ARRAY_TASK_ID": "3"}, "812_3"),
    ({"SLURM_JOB_ID": "812", "SLURM_ARRAY_JOB_ID": "", "SLURM_ARRAY_TASK_ID": ""}, "812"),
])
def test_slurm_job_key(env: dict, expected: str) -> None:
    assert slurm_job_key(env) == expected


def _clear_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def test_run_dir_keyed_by_job_in_a_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The guard lets ``${slurm_job:}`` through, in a file and on the command line, and it resolves
    from the environment the config is loaded in."""
    _clear_slurm(monkeypatch)
    config = tmp_path / "x.yaml"
    config.write_text(f"base: [{DEMO}]\nrun_dir: runs/${{name}}/${{slurm_job:}}\n")
    assert load_config(config).run_dir == "runs/t2i/local"
    monkeypatch.setenv("SLURM_JOB_ID", "815")
    assert load_config(config).run_dir == "runs/t2i/815"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "812")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert load_config(DEMO, ["run_dir=/scratch/${slurm_job:}"]).run_dir == "/scratch/812_3"


@pytest.mark.parametrize("value", ["${oc.env:SLURM_JOB_ID,local}", "${slurm_job:}-${oc.env:HOME}"])
def test_guard_still_refuses_oc_env(value: str) -> None:
    with pytest.raises(ConfigError, match="resolver 'oc.env'"):
        load_config(DEMO, [f"run_dir={value}"])
