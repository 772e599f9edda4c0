"""DataLoader workers that live through a job-wide SIGTERM, so the main process can save first.

SLURM's ``scancel``, a preemption and ``kill -TERM -PGID`` signal every process of the job step,
DataLoader workers included. torch's worker handler dies on a SIGTERM from anyone but its parent,
and the main process then fails at its next batch ("DataLoader worker (pid N) is killed by signal:
Terminated") before :class:`mmdiff.callbacks.requeue.RequeueOnSignal` can save at the step
boundary. The main process is the one that handles SIGTERM: it saves, then shuts its workers down.

So a worker here takes SIGTERM only from the loader's process — torch's ``terminate()`` of a worker
that did not stop, and multiprocessing's at interpreter exit, which would otherwise wait on it for
ever — and ignores it from anyone else. A Python signal handler cannot see the sender, so the
signal is blocked and a thread reads it with ``sigwaitinfo``. A worker still ends with its parent
(torch's worker loop watches the parent's pid).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable, FrozenSet, Optional

log = logging.getLogger(__name__)


def _await_sigterm(senders: FrozenSet[int]) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid in senders:
            os._exit(0)  # as torch's own worker handler does for its parent's SIGTERM
        log.debug("DataLoader worker %d: SIGTERM from pid %d ignored; the main process stops it",
                  os.getpid(), info.si_pid)


def ignore_foreign_sigterm(main_pid: int) -> None:
    """In a DataLoader worker: end on a SIGTERM from ``main_pid`` (the loader's process) or the parent
    (the same, unless a fork server started the worker), ignore everyone else's.

    Call it before the worker starts other threads: they inherit the blocked signal.
    """
    senders = frozenset((main_pid, os.getppid()))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_await_sigterm, args=(senders,), name="sigterm-filter", daemon=True).start()


class WorkerInit:
    """A DataLoader ``worker_init_fn``: :func:`ignore_foreign_sigterm`, then ``chained`` (the loader's own
    init function, e.g. Lightning's per-worker seeding), unchanged. Made in the loader's process;
    picklable for spawned workers."""

    def __init__(self, chained: Optional[Callable[[int], None]] = None) -> None:
        self.chained = chained
        self.main_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        ignore_foreign_sigterm(self.main_pid)
        if self.chained is not None:
            self.chained(worker_id)
