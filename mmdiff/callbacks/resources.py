"""Long-run health: resident memory and open file descriptors, sampled every N steps.

``trainer.probe_resources_every_n_steps: N`` (0 = off) adds :class:`ResourceProbe`. Every N
optimiser steps (and once at the start and the end of training) rank 0 appends one row to
``RUN_DIR/resources.csv``: the step, this process's resident set size (``VmRSS``), the summed RSS
of its descendant processes (data-loader workers, W&B's writer), their total, the number of
descendants, the number of open file descriptors of this process, not counting the shared-memory
segments of batches in flight from loader workers (``/dev/shm/torch_*``: their number follows the
prefetch queue, 4 more or fewer from one sample to the next), and those segments apart
(``shm_fds``). A leak shows up as a column
that keeps climbing after warm-up; :func:`summarize` turns the file into the figures
``tools/longrun_probe.py`` checks. Linux only (reads ``/proc``); elsewhere the probe logs one
warning and records nothing.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

FIELDS = ("step", "rss_main_mb", "rss_children_mb", "rss_total_mb", "children", "open_fds", "shm_fds")


def _rss_mb(pid: int) -> float:
    """``VmRSS`` of ``pid`` in MiB; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> List[int]:
    """Direct children of ``pid`` (over all its threads)."""
    found: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> List[int]:
    """All processes below ``pid`` (workers and their helpers)."""
    out: List[int] = []
    todo = _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo += _children(child)
    return out


def sample(step: int) -> Dict[str, float]:
    """One row of :data:`FIELDS` for this process now."""
    me = os.getpid()
    kids = descendants(me)
    main = _rss_mb(me)
    children = sum(_rss_mb(k) for k in kids)
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed since the listing (the listing's own descriptor, say)
            continue
    shm = sum(1 for t in targets if t.startswith("/dev/shm/torch_"))
    return {
        "step": step,
        "rss_main_mb": round(main, 1),
        "rss_children_mb": round(children, 1),
        "rss_total_mb": round(main + children, 1),
        "children": len(kids),
        "open_fds": len(targets) - shm,
        "shm_fds": shm,
    }


class ResourceProbe(Callback):
    """Append :func:`sample` rows to ``path`` every ``every_n_steps`` steps (rank 0)."""

    def __init__(self, path: str | Path, every_n_steps: int = 100) -> None:
        self.path = Path(path)
        self.every_n_steps = max(1, every_n_steps)
        self._last_step = -1
        self._enabled = Path("/proc/self/status").is_file()

    def _record(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(sample(step))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            log.warning("resource probe needs /proc (Linux); nothing is recorded")
        self._record(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)


def read_rows(path: str | Path) -> List[Dict[str, float]]:
    """The rows of a ``resources.csv`` as numbers."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def summarize(rows: List[Dict[str, float]], warmup_step: int) -> Dict[str, Optional[float]]:
    """Growth after warm-up: RSS (main and total) and open fds at ``warmup_step`` vs. later.

    ``*_growth_pct`` is the largest value after warm-up relative to the value at warm-up (the
    first row at or after ``warmup_step``), in percent; ``fds_max_increase`` the largest rise in
    open file descriptors over the warm-up count. ``fds_trend`` is the most fds open in the last
    third of the rows after warm-up minus the most in the first third: descriptors that come and
    go (data-loader pipes at epoch boundaries) cancel out, a leak makes it positive.
    """
    after = [r for r in rows if r["step"] >= warmup_step]
    if not after:
        raise ValueError(f"no resource sample at or after step {warmup_step}")
    base, end = after[0], after[-1]
    third = max(1, len(after) // 3)

    def growth(key: str) -> float:
        return round(100.0 * (max(r[key] for r in after) - base[key]) / base[key], 2)

    return {
        "warmup_step": base["step"],
        "end_step": end["step"],
        "rss_main_mb_warmup": base["rss_main_mb"],
        "rss_main_mb_end": end["rss_main_mb"],
        "rss_main_mb_max": max(r["rss_main_mb"] for r in after),
        "rss_main_growth_pct": growth("rss_main_mb"),
        "rss_total_mb_warmup": base["rss_total_mb"],
        "rss_total_mb_end": end["rss_total_mb"],
        "rss_total_mb_max": max(r["rss_total_mb"] for r in after),
        "rss_total_growth_pct": growth("rss_total_mb"),
        "open_fds_warmup": base["open_fds"],
        "open_fds_end": end["open_fds"],
        "open_fds_max": max(r["open_fds"] for r in after),
        "fds_max_increase": max(r["open_fds"] for r in after) - base["open_fds"],
        "fds_trend": max(r["open_fds"] for r in after[-third:]) - max(r["open_fds"] for r in after[:third]),
        "children_warmup": base["children"],
        "children_end": end["children"],
    }


__all__ = ["ResourceProbe", "FIELDS", "descendants", "read_rows", "sample", "summarize"]
