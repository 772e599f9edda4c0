"""Crash-safe checkpoint writes: a Lightning ``CheckpointIO`` that never leaves a half-written file.

Every checkpoint the trainer writes (``checkpoints/stepNNNNNNN.ckpt``, ``last.ckpt``, the SLURM
requeue ``hpc_ckpt_N.ckpt``) goes through :class:`AtomicCheckpointIO`:

1. ``torch.save`` streams into ``PATH.tmp-<pid>`` in the same directory;
2. the file is flushed and ``fsync``-ed, so its bytes are on disk;
3. ``os.replace`` renames it over ``PATH`` (atomic on POSIX within one file system);
4. the directory is ``fsync``-ed, so the rename itself survives a power cut.

A process killed at any point leaves either the previous ``PATH`` or the new one, never a torn
file; a leftover ``PATH.tmp-*`` is removed by the next save of the same path. A write that fails
(disk full, quota, file too large) removes its temporary file, keeps the previous checkpoint and
raises :class:`~mmdiff.errors.CheckpointError` with one sentence saying so.

Lightning's own ``TorchCheckpointIO`` first serialises the whole checkpoint into memory and
writes it without ``fsync``; this one streams and syncs (hence a class of our own).
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmdiff.errors import CheckpointError

log = logging.getLogger(__name__)

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than the system allows",
}


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_leftovers(path: Path) -> None:
    """Delete ``PATH.tmp-*`` files a killed writer of ``path`` left behind."""
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
        log.info("removed an unfinished checkpoint write %s", stale)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through a synced temporary file and an atomic rename.

    Raises :class:`CheckpointError` when the write fails; ``path`` is then the file it was before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = _REASONS.get(err.errno or 0, err.strerror or str(err))
        kept = "the previous checkpoint there is kept" if path.is_file() else "nothing was written"
        raise CheckpointError(
            f"cannot write checkpoint '{path}': {reason}; {kept}. Free space (or lower "
            "trainer.keep_last_n) and resume with --resume last."
        ) from None
    _fsync_dir(path.parent)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not take storage_options, got {storage_options!r}"
            )
        atomic_torch_save(checkpoint, path)


__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]
