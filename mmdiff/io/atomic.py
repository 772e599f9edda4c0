"""Crash-safe file writes: ``torch.save`` into a synced temporary file, then an atomic rename.

:func:`atomic_torch_save` writes ``PATH`` in four steps:

1. ``torch.save`` streams into ``PATH.tmp-<pid>`` in the same directory;
2. the file is flushed and ``fsync``-ed, so its bytes are on disk;
3. ``os.replace`` renames it over ``PATH`` (atomic on POSIX within one file system);
4. the directory is ``fsync``-ed, so the rename itself survives a power cut.

A process killed at any point leaves either the previous ``PATH`` or the new one, never a torn
file; a leftover ``PATH.tmp-*`` is removed by the next save of the same path. A write that fails
(disk full, quota, file too large) removes its temporary file, keeps the previous file and raises
:class:`~mmdiff.errors.CheckpointError` with one sentence saying so. Only torch is imported here,
so the function is cheap to use outside a training run.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

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
        log.info("removed an unfinished write %s", stale)


def _os_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind ``err`` (torch's zip writer re-raises a failed write as RuntimeError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through a synced temporary file and an atomic rename.

    Raises :class:`CheckpointError` when the write fails for a reason of the file system (disk
    full, quota, size limit, permissions); ``path`` is then the file it was before.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is None:
            raise
        reason = _REASONS.get(cause.errno or 0, cause.strerror or str(cause))
        kept = "the previous checkpoint there is kept" if path.is_file() else "nothing was written"
        raise CheckpointError(
            f"cannot write checkpoint '{path}': {reason}; {kept}. Free space (or lower "
            "trainer.keep_last_n) and resume with --resume last."
        ) from None
    _fsync_dir(path.parent)
    return path


__all__ = ["atomic_torch_save"]
