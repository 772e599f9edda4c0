"""Run the demo's training stages as `mmdiff fit` subprocesses, independent ones side by side.

The demo's models are small: a second thread speeds one of their steps up by 1.1–1.3×, while a second
process on the other core nearly doubles the work done. So stages whose inputs are ready run at
once, up to ``parallel`` of them, each with ``threads`` torch threads; a stage starts when the
stages it needs have finished. Each stage's output is echoed line by line, prefixed by its name,
and its wall and CPU seconds (its own and its data-loader workers', from ``os.wait4``) recorded.
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("demo")


@dataclass
class Stage:
    """One training run: a name, the command that runs it, and the stages whose output it reads."""

    name: str
    command: List[str]
    needs: Tuple[str, ...] = ()
    log_file: Optional[Path] = None


@dataclass
class StageTime:
    """Wall and CPU (user + system, children included) seconds of one finished stage."""

    wall: float
    cpu: float


@dataclass
class _Running:
    stage: Stage
    process: subprocess.Popen
    started: float
    reader: threading.Thread = field(init=False)


class StageFailed(RuntimeError):
    """A stage exited with a non-zero status."""


def fit_command(config: str, overrides: Sequence[str] = ()) -> List[str]:
    """The `mmdiff fit CONFIG key=value ...` command line with this interpreter."""
    return [sys.executable, "-m", "mmdiff.cli", "fit", config, *overrides]


def _echo(running: _Running, done: "queue.Queue[Tuple[str, int, float]]") -> None:
    """Echo the stage's output with its name, then reap it and report its exit status and CPU time."""
    stage, process = running.stage, running.process
    sink = open(stage.log_file, "w", encoding="utf-8") if stage.log_file else None
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if sink:
                sink.write(line)
            if line.strip():
                sys.stdout.write(f"[{stage.name}] {line}")
                sys.stdout.flush()
    finally:
        if sink:
            sink.close()
    # wait4, not Popen.wait: it also returns the CPU time of the child and the workers it reaped.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    done.put((stage.name, process.returncode, usage.ru_utime + usage.ru_stime))


def run_stages(stages: Sequence[Stage], parallel: int = 2, threads: int = 1) -> Dict[str, StageTime]:
    """Run ``stages`` respecting ``needs``, at most ``parallel`` at a time, each with ``threads`` threads.

    Returns each stage's time. Raises StageFailed (after stopping the stages still running) when
    one exits with an error, and ValueError when a stage needs one that is not in ``stages``.
    """
    names = {s.name for s in stages}
    for s in stages:
        missing = set(s.needs) - names
        if missing:
            raise ValueError(f"stage '{s.name}' needs {', '.join(sorted(missing))}, which is not a stage.")
    # Unbuffered: the echoed lines appear when written, not when a pipe buffer fills.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    pending = list(stages)
    running: Dict[str, _Running] = {}
    times: Dict[str, StageTime] = {}
    done: "queue.Queue[Tuple[str, int, float]]" = queue.Queue()
    try:
        while pending or running:
            for stage in [s for s in pending if set(s.needs) <= set(times)]:
                if len(running) >= parallel:
                    break
                pending.remove(stage)
                log.info("[%s] starting: %s", stage.name, " ".join(stage.command[2:]))
                process = subprocess.Popen(stage.command, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, bufsize=1)
                run = _Running(stage, process, time.time())
                run.reader = threading.Thread(target=_echo, args=(run, done), daemon=True)
                run.reader.start()
                running[stage.name] = run
            if not running:
                blocked = ", ".join(s.name for s in pending)
                raise ValueError(f"stages {blocked} wait on each other; their needs form a cycle.")
            name, code, cpu = done.get()
            run = running.pop(name)
            run.reader.join()
            if code != 0:
                where = f"; its log: {run.stage.log_file}" if run.stage.log_file else ""
                raise StageFailed(f"stage '{name}' failed with exit status {code}{where}.")
            times[name] = StageTime(time.time() - run.started, cpu)
            log.info("[%s] done: %.0f s wall, %.0f s CPU", name, times[name].wall, cpu)
    finally:
        for run in running.values():
            run.process.terminate()
        for run in running.values():
            run.reader.join()
    return times
