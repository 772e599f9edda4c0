"""Sweep files: the override sets of a job array (``slurm/sweep.sbatch``, ``mmdiff sweep``).

A sweep file is YAML with exactly one of

* ``grid:`` — config key → list of values; the tasks are the cartesian product, in file order
  with the last key varying fastest;
* ``list:`` — a list of mappings config key → value, one task each, in file order;

and optionally ``name:`` (default: the file's stem), the W&B group of the sweep's runs and the
folder its tasks' run directories share. Task ``I`` is the ``I``-th override set; keys are
checked against the config only when a config is loaded with them.
"""
from __future__ import annotations

import difflib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from mmdiff.config.loading import load_config
from mmdiff.errors import ConfigError, UsageError

TOP_KEYS = ("name", "grid", "list")
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")


@dataclass(frozen=True)
class Sweep:
    """A sweep file read and expanded: its name and each task's overrides as ``key=value`` text."""

    name: str
    tasks: Tuple[Tuple[str, ...], ...]
    source: str

    @property
    def array(self) -> str:
        """The ``sbatch --array`` range that runs every task once."""
        return f"0-{len(self.tasks) - 1}"

    def task(self, index: int) -> List[str]:
        """Task ``index``'s overrides; :class:`UsageError` naming the right ``--array`` when outside."""
        if not 0 <= index < len(self.tasks):
            raise UsageError(f"task {index} is not in sweep '{self.name}' ({self.source}), which has "
                             f"{len(self.tasks)} task(s); submit it with sbatch --array={self.array}.")
        return list(self.tasks[index])


def format_value(value: Any) -> str:
    """``value`` as the text after ``key=`` that the config loader reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True)
    return text.rstrip("\n").removesuffix("\n...").rstrip("\n")


def _check_value(key: str, value: Any, where: str) -> None:
    plain = (str, int, float, bool, type(None))
    if isinstance(value, list) and all(isinstance(v, plain) for v in value):
        value_ok = True
    else:
        value_ok = isinstance(value, plain)
    if not value_ok:
        raise ConfigError(f"'{key}' in {where} must be a plain value or a list of plain values, got "
                          f"{value!r:.60}; give each nested key its own dotted name (a.b.c).")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' in {where} must be a finite number, got {value}.")
    if "\n" in format_value(value):
        raise ConfigError(f"'{key}' in {where} holds a line break; sweep values must fit on one line.")


def _overrides(entry: Mapping[str, Any], where: str) -> Tuple[str, ...]:
    for key, value in entry.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ConfigError(f"'{key}' in {where} is not a config key; write dotted keys such as optim.lr.")
        _check_value(key, value, where)
    return tuple(f"{key}={format_value(value)}" for key, value in entry.items())


def _grid(grid: Any, source: str) -> List[Tuple[str, ...]]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"'grid' in {source} must map config keys to lists of values, e.g. grid: "
                          "{optim.lr: [1.0e-4, 3.0e-4]}.")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid key '{key}' in {source} must hold a non-empty list of values, got "
                              f"{values!r:.60}.")
    keys = list(grid)
    return [_overrides(dict(zip(keys, point)), source) for point in itertools.product(*grid.values())]


def _list(entries: Any, source: str) -> List[Tuple[str, ...]]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"'list' in {source} must be a non-empty list of override mappings, e.g. "
                          "list: [{optim.lr: 1.0e-4}, {optim.lr: 3.0e-4, data.batch_size: 64}].")
    tasks = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(f"list entry {i} in {source} must be a non-empty mapping of config keys to "
                              f"values, got {entry!r:.60}.")
        tasks.append(_overrides(entry, f"list entry {i} of {source}"))
    return tasks


def parse_sweep(data: Any, source: str, default_name: str) -> Sweep:
    """Check and expand a sweep file's content (see the module docstring)."""
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {source} must hold a mapping with grid: or list: (and name:).")
    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{key}' in sweep file {source}{hint} (a sweep file holds "
                              "grid: or list:, and name:)")
    if ("grid" in data) == ("list" in data):
        raise ConfigError(f"sweep file {source} must hold exactly one of grid: and list:.")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"'name' in sweep file {source} must be a word of letters, digits, '.', '_' or '-' "
                          f"(it names the W&B group and a folder), got {name!r}.")
    tasks = _grid(data["grid"], source) if "grid" in data else _list(data["list"], source)
    return Sweep(name=name, tasks=tuple(tasks), source=source)


def read_sweep(path: str | Path) -> Sweep:
    """Read and expand the sweep file at ``path``; :class:`ConfigError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist; pass the path of a YAML file.")
    try:
        # OmegaConf's YAML reading, so values read as they do in configs (1e-4 is a number, not text).
        node = OmegaConf.load(path)
    except Exception as err:  # YAML syntax and OmegaConf's own errors alike: first line only
        raise ConfigError(f"sweep file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    data = OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node
    return parse_sweep(data, str(path), path.stem)


def task_run_dir(base: str, sweep: Sweep, index: int) -> str:
    """Task ``index``'s run directory under a config's ``run_dir``: ``BASE/<sweep name>/task-<index>``."""
    return f"{base.rstrip('/')}/{sweep.name}/task-{index}"


def has_key(overrides: Sequence[str], key: str) -> bool:
    """One of ``overrides`` (``key=value`` text) sets ``key``."""
    return any(o.partition("=")[0] == key for o in overrides)


def fit_arguments(sweep: Sweep, index: int, config: Optional[str | Path] = None,
                  overrides: Sequence[str] = ()) -> List[str]:
    """Task ``index``'s ``mmdiff fit`` overrides. Without a config: the sweep's own. With one (the
    config is loaded with them, so a bad key fails here): ``overrides``, the task's, then
    ``run_dir=<run_dir>/<sweep name>/task-<index>`` unless the task sets ``run_dir`` (``run_dir`` as
    ``overrides`` leave it), and ``logger.group=<sweep name>`` unless the group is set."""
    task = sweep.task(index)
    if config is None:
        return task
    argv = [*overrides, *task]
    cfg = load_config(config, argv)
    if not has_key(task, "run_dir"):
        base = str(load_config(config, overrides).run_dir)
        argv.append(f"run_dir={format_value(task_run_dir(base, sweep, index))}")
    if cfg.logger.group is None:
        argv.append(f"logger.group={format_value(sweep.name)}")
    return argv


__all__ = ["Sweep", "fit_arguments", "format_value", "has_key", "parse_sweep", "read_sweep", "task_run_dir"]
