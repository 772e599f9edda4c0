"""Sweep files (mmdiff.config.sweeps) and ``mmdiff sweep`` / ``mmdiff sync``: expansion order,
one-line errors, the argument list slurm/sweep.sbatch passes to ``mmdiff fit``, and W&B sync."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest
from omegaconf import OmegaConf

from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.config.sweeps import format_value, parse_sweep, read_sweep
from mmdiff.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo" / "text_to_image.yaml")
GRID = REPO / "configs" / "sweeps" / "t2i_grid.yaml"


def _sweep(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_grid_is_the_cartesian_product_last_key_fastest() -> None:
    sweep = parse_sweep({"grid": {"optim.lr": [1.0e-4, 1.0e-3], "seed": [0, 1, 2]}}, "x.yaml", "x")
    assert sweep.name == "x" and sweep.array == "0-5"
    assert [list(t) for t in sweep.tasks] == [
        [f"optim.lr={lr}", f"seed={s}"] for lr in ("0.0001", "0.001") for s in (0, 1, 2)]


def test_list_keeps_its_order_and_names_the_group() -> None:
    sweep = parse_sweep({"name": "abl", "list": [{"optim.lr": 1.0e-4}, {"optim.lr": 3.0e-4, "data.batch_size": 4}]},
                        "x.yaml", "x")
    assert sweep.name == "abl"
    assert [list(t) for t in sweep.tasks] == [["optim.lr=0.0001"], ["optim.lr=0.0003", "data.batch_size=4"]]


@pytest.mark.parametrize("value", [1.0e-4, 3, True, None, "a b", "007", "true", "null", "", "a=b", [1, 2],
                                   ["x y", "z"], "runs/${name}/${slurm_job:}"])
def test_values_reach_the_config_as_written(value) -> None:
    """The ``key=value`` text a task passes reads back as the sweep file's value (strings that look
    like numbers, booleans or null stay strings)."""
    back = OmegaConf.from_dotlist([f"k={format_value(value)}"])
    assert OmegaConf.to_container(back, resolve=False)["k"] == value


def test_task_overrides_keep_the_sweep_values() -> None:
    """A task's overrides read back as the sweep file's values, text that looks like a number included."""
    values = {"name": "007", "sampling.prompts": ["a b", "true"], "optim.text_encoder_lr": None}
    (task,) = parse_sweep({"list": [values]}, "x.yaml", "x").tasks
    back = OmegaConf.to_container(OmegaConf.from_dotlist(list(task)), resolve=False)
    assert (back["name"], back["sampling"]["prompts"], back["optim"]["text_encoder_lr"]) == ("007", ["a b", "true"], None)


def test_example_sweep_file_checks_against_the_demo(capsys) -> None:
    """configs/sweeps/t2i_grid.yaml: 3 learning rates, every task a valid override of the demo config."""
    sweep = read_sweep(GRID)
    assert len(sweep.tasks) == 3
    for task in sweep.tasks:
        load_config(DEMO, list(task))
    assert main(["sweep", str(GRID), DEMO]) == 0
    out = capsys.readouterr().out
    assert "3 task(s)" in out and "sbatch --array=0-2 slurm/sweep.sbatch" in out


@pytest.mark.parametrize("text, message", [
    ("grdi: {seed: [1]}\n", "unknown key 'grdi' in sweep file .* did you mean 'grid'"),
    ("grid: {}\n", "'grid' in .* must map config keys to lists"),
    ("grid: {seed: 3}\n", "grid key 'seed' in .* must hold a non-empty list"),
    ("grid: {seed: []}\n", "grid key 'seed' in .* must hold a non-empty list"),
    ("list: []\n", "'list' in .* must be a non-empty list"),
    ("list: [seed]\n", "list entry 0 in .* must be a non-empty mapping"),
    ("grid: {seed: [1]}\nlist: [{seed: 1}]\n", "exactly one of grid: and list:"),
    ("name: t2i\n", "exactly one of grid: and list:"),
    ("name: a/b\ngrid: {seed: [1]}\n", "'name' in sweep file .* must be a word"),
    ("grid: {model: [{unet: 1}]}\n", "'model' in .* must be a plain value or a list of plain values"),
    ("list: [{'bad key': 1}]\n", "'bad key' in list entry 0 .* is not a config key"),
    ("- seed\n", "must hold a mapping with grid: or list:"),
    ("grid: [\n", "is not valid YAML"),
])
def test_malformed_sweep_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        read_sweep(_sweep(tmp_path, text))
    assert "\n" not in str(err.value)


def _task_argv(argv: List[str], capsys) -> List[str]:
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out.splitlines()


def test_task_arguments_for_sweep_sbatch(tmp_path: Path, capsys) -> None:
    """``--task I`` with a config: the user's overrides, the task's, then the task's own run dir
    under the config's run_dir and the sweep's W&B group."""
    sweep = _sweep(tmp_path, "name: lr3\nlist: [{optim.lr: 1.0e-4}, {optim.lr: 3.0e-4}]\n")
    argv = _task_argv(["sweep", sweep, DEMO, f"run_dir={tmp_path}/runs", "--trainer.max_steps", "7",
                       "--task", "1"], capsys)
    assert argv == [f"run_dir={tmp_path}/runs", "trainer.max_steps=7", "optim.lr=0.0003",
                    f"run_dir={tmp_path}/runs/lr3/task-1", "logger.group=lr3"]
    cfg = load_config(DEMO, argv)
    assert (cfg.run_dir, cfg.optim.lr, cfg.logger.group) == (f"{tmp_path}/runs/lr3/task-1", 3.0e-4, "lr3")
    # a group set by the user, and a run dir set by the sweep, are kept
    argv = _task_argv(["sweep", sweep, DEMO, "logger.group=mine", "--task", "0"], capsys)
    assert "logger.group=lr3" not in argv and load_config(DEMO, argv).logger.group == "mine"
    fixed = _sweep(tmp_path, "list: [{run_dir: /data/a}]\n", "fixed.yaml")
    assert _task_argv(["sweep", fixed, DEMO, "--task", "0"], capsys) == ["run_dir=/data/a", "logger.group=fixed"]
    # without a config: the sweep's overrides alone
    assert _task_argv(["sweep", sweep, "--task", "0"], capsys) == ["optim.lr=0.0001"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "2"], "task 2 is not in sweep 'lr3' .* 2 task\\(s\\); submit it with sbatch --array=0-1"),
    ([DEMO, "optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["optim.lr=1"], "overrides need a config"),
])
def test_sweep_command_errors(tmp_path: Path, capsys, argv: List[str], message: str) -> None:
    import re

    sweep = _sweep(tmp_path, "name: lr3\nlist: [{optim.lr: 1.0e-4}, {optim.lr: 3.0e-4}]\n")
    assert main(["sweep", sweep, *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_sync_uploads_the_runs_offline_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mmdiff sync CONFIG ARGS``: ``wandb sync`` on RUN_DIR/wandb/offline-run-*, oldest first,
    with fit's own flags accepted; no call when there is nothing to sync."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "wandb").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "wandb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    assert main(["sync", DEMO, f"run_dir={run_dir}"]) == 0
    assert not calls.exists()
    folders = [run_dir / "wandb" / f"offline-run-2026010{i}_000000-abc" for i in (2, 1)]
    for folder in folders:
        folder.mkdir(parents=True)
    (run_dir / "wandb" / "run-20260103_000000-online").mkdir()
    assert main(["sync", DEMO, f"--run_dir={run_dir}", "--resume", "last"]) == 0
    assert calls.read_text().splitlines() == [f"sync {folders[1]} {folders[0]}"]
