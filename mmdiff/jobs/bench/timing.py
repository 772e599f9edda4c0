"""Clocks and statistics of the bench: stamps, step intervals, medians, load and memory."""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so clocks read finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def loadavg() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def median(xs: Sequence[float]) -> float:
    """Median of ``xs``; NaN when empty."""
    return float(statistics.median(xs)) if xs else float("nan")

def stamp() -> tuple[float, float]:
    """(wall clock, CPU time of this process: all its threads, not the loader workers)."""
    return time.perf_counter(), time.process_time()


Times = Dict[str, List[float]]


def intervals(stamps: List[tuple[float, float]], warmup: int) -> Times:
    """Wall and CPU step times from the stamps after each of ``warmup + steps`` steps: the last
    ``steps`` (step 1 has no start stamp, so at least one warm-up step is always made)."""
    skip = max(1, warmup) - 1
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][skip:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][skip:]
    return {"wall": wall, "cpu": cpu}

def train_row(times: Times, batch_size: int) -> Dict[str, Any]:
    """One result row from step times: median step, images/s and the raw intervals."""
    wall, cpu = times["wall"], times["cpu"]
    med = median(wall)
    return {"step_s": med, "images_per_s": batch_size / med if med > 0 else float("nan"),
            "step_s_min": min(wall) if wall else float("nan"), "steps": len(wall),
            "step_cpu_s": median(cpu), "step_s_all": [round(x, 6) for x in wall],
            "step_cpu_s_all": [round(x, 6) for x in cpu]}
