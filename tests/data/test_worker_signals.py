"""Loader workers live through a SIGTERM sent to the whole job (SLURM, ``killpg``) but not their
parent's; the loader's own ``worker_init_fn`` (Lightning's seeding) still runs
(:mod:`mmdiff.data.worker_signals`, :class:`mmdiff.data.datamodule.PassLoader`)."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Iterator, Tuple

from torch.utils.data import IterableDataset

from mmdiff.data.datamodule import PassLoader


def mark_worker(worker_id: int) -> None:
    """The loader's own init function: leaves a trace the worker's items carry."""
    os.environ["MMDIFF_TEST_WORKER_INIT"] = f"ran for worker {worker_id}"


class Endless(IterableDataset):
    """Items (worker pid, init trace, index), for ever; ``new_pass`` as PassLoader's streams have."""

    def new_pass(self) -> None:
        pass

    def __iter__(self) -> Iterator[Tuple[int, str, int]]:
        index = 0
        while True:
            yield os.getpid(), os.environ.get("MMDIFF_TEST_WORKER_INIT", ""), index
            index += 1


def test_worker_ignores_a_foreign_sigterm_and_runs_the_chained_init() -> None:
    loader = PassLoader(Endless(), batch_size=None, num_workers=1, worker_init_fn=mark_worker)
    it = iter(loader)
    try:
        pid, trace, _ = next(it)
        assert trace == "ran for worker 0"
        assert loader.worker_init_fn is mark_worker  # what Lightning sees: its own seeding is not replaced
        # From another process, as slurmstepd or `kill -TERM -PGID` sends it. kill(2) returns once the
        # signal is pending, and the worker acts on it before it makes another item.
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        later = [next(it) for _ in range(10)]  # more than the prefetched ones: made after the signal
        assert {p for p, _, _ in later} == {pid}
    finally:
        it._it._shutdown_workers()


def test_worker_still_ends_on_its_parents_sigterm() -> None:
    """torch's terminate() of a stuck worker and multiprocessing's at exit: ignoring those would hang the exit."""
    loader = PassLoader(Endless(), batch_size=None, num_workers=1)
    it = iter(loader)
    try:
        next(it)
        worker = it._it._workers[0]
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(timeout=60)
        assert worker.exitcode == 0
    finally:
        it._it._shutdown_workers()
