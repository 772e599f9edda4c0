"""Crash-safe file writes: every file mmdiff writes goes to a temporary file, then an atomic rename.

:class:`AtomicFile` writes ``PATH`` in four steps:

1. the caller writes into ``PATH.tmp-<host>-<pid>-<token>`` in the same directory — a name no
   other writer shares, so ranks or threads writing the same path never rename each other's
   temporary file away;
2. the file is flushed and ``fsync``-ed, so its bytes are on disk;
3. ``os.replace`` renames it over ``PATH`` (atomic on POSIX within one file system);
4. the directory is ``fsync``-ed, so the rename itself survives a power cut.

A process killed at any point leaves either the previous ``PATH`` or the new one, never a torn
file. With ``remove_leftovers=True`` (checkpoints, shards) a leftover ``PATH.tmp-*`` of a writer
on this host that is no longer running is removed first. An exception while writing removes the
temporary file and keeps the previous ``PATH``.

:func:`write_bytes_atomic` and :func:`write_text_atomic` write a whole file in one call;
:func:`atomic_torch_save` is ``torch.save`` through :class:`AtomicFile`, and turns a failed write
(disk full, quota, file too large) into :class:`~mmdiff.errors.CheckpointError` with one sentence.
This module imports nothing heavy, so torch-free code (the config) can use it too.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Optional, Set, Type

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


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


# Temporary files this process has open: a same-pid leftover not in here is from a killed process
# whose pid was reused (a requeued job in a fresh container often gets the same one).
_OPEN: Set[str] = set()


def _remove_leftovers(path: Path) -> None:
    """Delete ``PATH.tmp-*`` files that a killed writer on this host left behind (never those of
    a writer still running, nor of another host: their state cannot be known from here)."""
    host = _host()
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        parts = stale.name[len(path.name) + len(".tmp-"):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        live = stale.name in _OPEN if pid == os.getpid() else _pid_running(pid)
        if live:
            continue
        stale.unlink(missing_ok=True)
        log.info("removed an unfinished write %s", stale)


class AtomicFile:
    """A binary file opened under a temporary name that replaces ``path`` on :meth:`commit`.

    As a context manager it commits when the block ends normally and discards otherwise::

        with AtomicFile(path) as f:
            f.write(data)

    ``fsync=False`` skips both syncs (the rename is still atomic against a killed process, not
    against a power cut) for many small files where a sync each would cost more than it saves.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True, remove_leftovers: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.tmp = self.path.with_name(
            f"{self.path.name}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if remove_leftovers:
            _remove_leftovers(self.path)
        self.file: IO[bytes] = open(self.tmp, "wb")
        _OPEN.add(self.tmp.name)

    def commit(self) -> Path:
        """Flush (and sync) the file, rename it over ``path`` and return ``path``."""
        try:
            self.file.flush()
            if self.fsync:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        _OPEN.discard(self.tmp.name)
        if self.fsync:
            _fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Close and delete the temporary file; ``path`` stays what it was."""
        try:
            self.file.close()
        except OSError:
            pass  # a full disk can fail the final flush too; the file goes anyway
        if self.tmp.parent.is_dir():
            self.tmp.unlink(missing_ok=True)
        _OPEN.discard(self.tmp.name)

    def __enter__(self) -> IO[bytes]:
        return self.file

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` through :class:`AtomicFile`; return ``path``."""
    with AtomicFile(path, fsync=fsync) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :class:`AtomicFile`; return ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


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
    """``torch.save(obj, path)`` through :class:`AtomicFile` (leftovers of killed writers removed).

    Raises :class:`CheckpointError` when the write fails for a reason of the file system (disk
    full, quota, size limit, permissions); ``path`` is then the file it was before.
    """
    import torch  # here, not at the top: the torch-free config saves through this module

    path = Path(path)
    try:
        with AtomicFile(path, remove_leftovers=True) as f:
            torch.save(obj, f)
    except BaseException as err:
        cause = _os_error(err)
        if cause is None:
            raise
        reason = _REASONS.get(cause.errno or 0, cause.strerror or str(cause))
        kept = "the previous checkpoint there is kept" if path.is_file() else "nothing was written"
        raise CheckpointError(
            f"cannot write checkpoint '{path}': {reason}; {kept}. Free space (or lower "
            "trainer.keep_last_n) and resume with --resume last."
        ) from None
    return path


__all__ = ["AtomicFile", "atomic_torch_save", "write_bytes_atomic", "write_text_atomic"]
