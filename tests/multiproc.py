"""Run the processes of a multi-rank test at once, without a pipe deadlock, and stop them all.

Each process writes to its own log file. With ``stdout=PIPE`` a test that waits on rank 0's
``communicate()`` leaves rank 1's pipe unread: once rank 1 has written a pipe buffer (64 KiB) of
logs and warnings it blocks in ``write()``, rank 0 then blocks in the next collective, and the test
reports a hang that is its own. On a timeout every process is sent SIGUSR2 first (the Python
workers register ``faulthandler`` for it and print every thread's stack), and the failure shows
the tail of each log. ``free_port`` hands out the port of a run's rank-0 store.

A ``python WORKER.py ARGS`` command starts warm: forked from a multiprocessing forkserver that has
imported torch, Lightning and mmdiff once. Each fresh interpreter spent about 10 CPU seconds on
those imports, most of a tiny rank's work and most of the default run's multi-rank tests. Forked,
the worker runs as ``python WORKER.py`` would (``__main__``, its argv and environment, its folder on
``sys.path``, its own session and log) from an interpreter in which nothing but imports has run.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import random
import runpy
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Union

import pytest


_FIRST_PORT = 20000  # below Linux's ephemeral range (32768-60999), which bind(0) and connect() draw from
_BLOCK = 2000  # ports per test process: pytest itself, or each pytest-xdist worker
_handed_out: Set[int] = set()


def free_port() -> int:
    """A free TCP port for a multi-rank run's store, never the one another test of this run got.

    The usual ``bind(0)``-and-close leaves the port unheld until the ranks start, seconds later;
    meanwhile the kernel may give it to any other bind(0) or outgoing connection, and under
    pytest-xdist the other worker's ranks open many. So each test process draws at random from
    its own block of ports below the ephemeral range (random: other test runs on this machine),
    never hands one out twice, and checks that the port is free right now.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...; unset without xdist
    index = int(worker[2:]) + 1 if worker[2:].isdigit() else 0
    start = _FIRST_PORT + index % ((32768 - _FIRST_PORT) // _BLOCK) * _BLOCK
    draw = random.Random()  # not the global RNG: tests seed that one
    for _ in range(500):
        port = start + draw.randrange(_BLOCK)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {start}-{start + _BLOCK - 1}")


# What the worker scripts import; the forkserver imports them once, its children start with them.
_WARM_MODULES = ["lightning", "torch.distributed.fsdp", "mmdiff.systems.text_to_image", "mmdiff.run.training",
                 "mmdiff.run.strategies", "mmdiff.data.datamodule", "mmdiff.callbacks.requeue"]


@functools.cache
def _warm_context() -> BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_WARM_MODULES)
    return context


def _run_script(script: str, args: List[str], env: Dict[str, str], log: str) -> None:
    """In the forked child: become ``python script args`` with ``env``, writing to ``log``."""
    os.setsid()  # like Popen(start_new_session=True): _stop signals the worker and its children
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: a timeout shows a current log tail
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    # the forkserver made itself this process's start method; a script's own DataLoader workers etc.
    # start the way they would in `python script.py` (the platform's default)
    multiprocessing.set_start_method(None, force=True)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


class _Forked:
    """A forkserver child with the parts of ``subprocess.Popen`` that run_all uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.process.exitcode

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self) -> Optional[int]:
        self.process.join()
        return self.process.exitcode


Started = Union[subprocess.Popen, _Forked]


def _start(command: Sequence[str], env: Dict[str, str], log: Path) -> Started:
    if len(command) >= 2 and command[0] == sys.executable and command[1].endswith(".py"):
        log.write_text("")  # there even when the child fails before it gets to its script
        process = _warm_context().Process(target=_run_script, args=(command[1], list(command[2:]), env, str(log)))
        process.start()
        return _Forked(process)
    with open(log, "w") as out:
        return subprocess.Popen(list(command), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: Started, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the whole session: torchrun's and Lightning's children too
    except ProcessLookupError:  # gone, or a forked worker not yet in its own session
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def run_all(commands: Sequence[Sequence[str]], log_dir: Path, env: Dict[str, str], timeout: float) -> List[str]:
    """Start ``commands`` together, wait for all (``timeout`` seconds in total) and return their outputs.

    The test fails when a process exits non-zero, with that process's output; the others are then
    stopped at once, so a rank that died (e.g. on a port another program took) is reported with its
    own error, not as a hang of the rank that waits for it.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"process{i}.log" for i in range(len(commands))]
    procs: List[Started] = []
    failed: List[int] = []
    try:
        for command, log in zip(commands, logs):
            procs.append(_start(command, env, log))
        deadline = time.monotonic() + timeout
        while any(proc.poll() is None for proc in procs):
            failed = [i for i, proc in enumerate(procs) if proc.returncode not in (None, 0)]
            if failed:
                break
            if time.monotonic() > deadline:
                for proc in procs:
                    if proc.poll() is None:
                        _stop(proc, signal.SIGUSR2)
                time.sleep(2)
                tails = "\n".join(f"--- process {i} ---\n{log.read_text()[-6000:]}" for i, log in enumerate(logs))
                pytest.fail(f"the processes did not finish within {timeout:.0f} s (a hang?); their output:\n{tails}")
            time.sleep(0.2)
        failed = failed or [i for i, proc in enumerate(procs) if proc.returncode != 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                _stop(proc, signal.SIGKILL)
                proc.wait()
    if failed:
        first = failed[0]
        pytest.fail(f"process {first} exited with code {procs[first].returncode}:\n{logs[first].read_text()[-4000:]}")
    return [log.read_text() for log in logs]
