"""Shard specs → concrete shard URLs, and where this process sits in the distributed job.

A spec is a local path, a brace pattern (``data/train-{000000..000003}.tar``), a glob
(``data/train-*.tar``), a ``pipe:`` command (``pipe:cat x.tar``) or any URL webdataset's ``gopen``
understands; several specs may be given as a list or joined with ``::``.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Iterable, List, Sequence, Tuple
from urllib.parse import urlparse

import torch.distributed as dist
from torch.utils.data import get_worker_info
from webdataset.shardlists import expand_urls

from mmdiff.errors import DataError

log = logging.getLogger(__name__)

_GLOB_CHARS = ("*", "?", "[")


def local_path(url: str) -> str | None:
    """The filesystem path of a local shard URL (plain path or ``file:``), else None."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "":
        return url
    return None


def expand_shards(specs: str | Sequence[str], what: str = "data.train_shards") -> List[str]:
    """Expand shard specs into a flat list of shard URLs, checking that local files exist.

    Raises :class:`DataError` naming the spec when a local shard is missing or nothing matches.
    """
    if isinstance(specs, str):
        specs = [specs]
    urls: List[str] = []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        try:
            expanded = expand_urls(spec)
        except AssertionError as err:  # a ${VAR} with no WDS_VAR in the environment
            raise DataError(f"{what}: cannot expand '{spec}': {err}.") from None
        for url in expanded:
            path = local_path(url)
            if path is None:  # pipe:, http:, s3: ... checked when read
                urls.append(url)
                continue
            path = os.path.expanduser(path)
            if any(ch in path for ch in _GLOB_CHARS):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise DataError(f"{what}: no shard matches '{path}'; check the pattern.")
                urls.extend(matches)
            elif not os.path.isfile(path):
                raise DataError(f"{what}: shard '{path}' does not exist; check the path or pattern.")
            else:
                urls.append(path)
    return urls


def _env_int(names: Iterable[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)  # type: ignore[arg-type]
            except ValueError:
                log.warning("ignoring non-integer environment variable %s=%r", name, value)
    return default


def rank_and_world() -> Tuple[int, int]:
    """(global rank, world size): from ``torch.distributed`` when initialised, else env, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = _env_int(("WORLD_SIZE",), 1)
    rank = _env_int(("RANK",), 0)
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"environment has RANK={rank} and WORLD_SIZE={world}; fix the launcher settings.")
    return rank, world


def worker_and_count() -> Tuple[int, int]:
    """(DataLoader worker id, number of workers) of the calling process; (0, 1) in the main process."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return info.id, info.num_workers
