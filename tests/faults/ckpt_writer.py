"""Subprocess for the checkpoint-write fault tests: ``python ckpt_writer.py MODE PATH``.

Saves a small checkpoint A to PATH with :func:`mmdiff.io.atomic.atomic_torch_save`, then a
4 MB checkpoint B over it:

* ``block``: B's write stops for good once half its bytes are written, after printing
  ``HALF <tmp path>`` on stdout (the test then SIGKILLs this process);
* ``fsize``: the process may not write files over 1 MB (``RLIMIT_FSIZE``), so B fails with EFBIG;
  prints the error's message;
* ``plain``: no limit (PATH is on a small tmpfs the test mounted): B fails with ENOSPC.
"""
from __future__ import annotations

import io
import resource
import signal
import sys
import threading

import torch

import mmdiff.io.atomic as cio
from mmdiff.errors import CheckpointError

B_BYTES = 4 * 2**20


class _Blocking(io.FileIO):
    """A file that announces itself and blocks forever once ``limit`` bytes are written."""

    def __init__(self, path, mode: str, limit: int) -> None:
        super().__init__(path, mode)
        self.limit = limit
        self.written = 0

    def write(self, data) -> int:
        n = super().write(data)
        self.written += n
        if self.written >= self.limit:
            super().flush()
            print(f"HALF {self.name}", flush=True)
            threading.Event().wait()  # never returns: the test kills us here
        return n


def main(mode: str, path: str) -> int:
    cio.atomic_torch_save({"name": "A", "w": torch.ones(16)}, path)
    b = {"name": "B", **{f"w{i}": torch.zeros(B_BYTES // 32) for i in range(8)}}  # 8 records
    if mode == "block":
        cio.open = lambda p, m: _Blocking(p, m, limit=B_BYTES // 2)  # type: ignore[attr-defined]
    elif mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-limit writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    try:
        cio.atomic_torch_save(b, path)
    except CheckpointError as err:
        print(str(err), flush=True)
        return 1
    print("saved", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
