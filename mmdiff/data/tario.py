"""Reading webdataset tar shards as raw samples: members grouped by key, bytes left undecoded.

Members are grouped the way webdataset does it (``base_plus_ext``: the key is the path up to the
first dot of the file name, the rest is the extension; consecutive members with one key form a
sample; ``__meta__`` members are skipped). Each sample also gets its *position* in the shard, so
validation can address "samples 40..79 of shard 3" without trusting keys to be unique.

Nothing here decodes a member: bytes stay bytes until :mod:`mmdiff.data.decode` looks at them.
"""
from __future__ import annotations

import logging
import re
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from mmdiff.data.shards import local_path

log = logging.getLogger(__name__)

_META = re.compile(r"__[^/]*__($|/)")


class ShardError(Exception):
    """A shard could not be opened, or its tar stream broke between samples."""


@dataclass
class RawSample:
    """One sample of a shard: its key, position, and undecoded members by lower-case extension."""

    key: str
    url: str
    pos: int
    members: Dict[str, bytes] = field(default_factory=dict)
    # Set when the shard broke inside this sample (truncated member, duplicate member, ...).
    error: Optional[str] = None


def split_name(name: str) -> Optional[Tuple[str, str]]:
    """(key, lower-case extension) of a tar member name, or None for members that are not samples."""
    base = name.rsplit("/", 1)[-1]
    if _META.match(name) or (base.startswith("__") and base.endswith("__")):
        return None
    key, ext = base_plus_ext(name)
    if key is None or not ext:
        return None
    return key, ext.lower()


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200]


def _pipe_reason(stream: object, err: BaseException) -> str:
    status = getattr(stream, "status", None)
    if status is not None:
        return f"the pipe command exited with status {status}"
    return _short(err)


def _close_quietly(*objs: object) -> None:
    for obj in objs:
        try:
            obj.close()  # type: ignore[attr-defined]
        except Exception:  # a pipe that exited non-zero after we stopped reading early
            pass


def iter_samples(
    url: str,
    want: Optional[Callable[[int], bool]] = None,
    stop: Optional[int] = None,
) -> Iterator[RawSample]:
    """Stream the samples of one shard in order.

    ``want(pos)`` says whose member bytes to read (others come back with empty ``members``);
    reading ends before position ``stop``. A member that cannot be read ends the shard after
    yielding its sample with ``error`` set; a shard that cannot be opened, or whose stream breaks
    between samples, raises :class:`ShardError` (after yielding the samples read so far).
    """
    try:
        stream = gopen(url, "rb")
    except Exception as err:
        raise ShardError(f"cannot open shard {url}: {_short(err)}") from None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except Exception as err:
        reason = _short(err)
        try:
            stream.close()
        except Exception as close_err:  # e.g. the pipe's command failed: that is the real reason
            reason = _pipe_reason(stream, close_err)
        raise ShardError(f"cannot read shard {url}: {reason}") from None

    finished = False
    current: Optional[RawSample] = None
    pos = -1
    try:
        members = iter(tar)
        while True:
            try:
                info = next(members)
            except StopIteration:
                break
            except Exception as err:
                if current is not None:
                    yield current
                current = None
                raise ShardError(f"shard {url} is unreadable after sample {pos}: {_short(err)}") from None
            if not info.isreg():
                continue
            parts = split_name(info.name)
            if parts is None:
                continue
            key, ext = parts
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = None
                pos += 1
                if stop is not None and pos >= stop:
                    return  # early stop: close without checking the pipe's exit status
                current = RawSample(key=key, url=url, pos=pos)
            if want is not None and not want(pos):
                continue
            if ext in current.members:
                current.error = f"duplicate member {info.name}"
                continue
            try:
                handle = tar.extractfile(info)
                current.members[ext] = handle.read() if handle is not None else b""
            except Exception as err:
                current.error = f"cannot read member {info.name}: {_short(err)}"
                log.warning("shard %s is truncated or corrupt at %s; the rest of it is skipped", url, info.name)
                yield current
                current = None
                return
        if current is not None:
            yield current
            current = None
        finished = True
    finally:
        if finished:
            try:
                tar.close()
                stream.close()
            except Exception as err:
                raise ShardError(f"shard {url} did not close cleanly: {_pipe_reason(stream, err)}") from None
        else:
            _close_quietly(tar, stream)


def _group_keys(names: Iterable[str]) -> List[str]:
    keys: List[str] = []
    for name in names:
        parts = split_name(name)
        if parts is None:
            continue
        if not keys or parts[0] != keys[-1]:
            keys.append(parts[0])
    return keys


def list_keys(url: str) -> List[str]:
    """The sample keys of a shard, in order (one entry per sample position).

    Local files are listed from tar headers only (seeking over the data); other URLs are streamed.
    A shard that breaks part-way is listed up to the break, with a warning; one that cannot be
    opened raises :class:`ShardError`.
    """
    path = local_path(url)
    if path is None:
        keys: List[str] = []
        try:
            for sample in iter_samples(url, want=lambda _pos: False):
                keys.append(sample.key)
        except ShardError as err:
            if not keys:
                raise
            log.warning("%s; listed %d samples before the break", err, len(keys))
        return keys
    names: List[str] = []
    try:
        tar = tarfile.open(path, "r:*")
    except Exception as err:
        raise ShardError(f"cannot read shard {url}: {_short(err)}") from None
    try:
        for info in tar:
            if info.isreg():
                names.append(info.name)
    except Exception as err:
        log.warning("shard %s is unreadable after %d members (%s); listing what came before",
                    url, len(names), _short(err))
    finally:
        _close_quietly(tar)
    return _group_keys(names)
