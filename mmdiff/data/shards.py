"""Shard specs → concrete shard URLs, and where this process sits in the distributed job.

A spec is a local path, a folder (its ``*.tar`` files, e.g. img2dataset's output: see
:mod:`mmdiff.data.img2dataset`), a brace pattern (``data/train-{000000..000003}.tar``), a glob
(``data/train-*.tar``), a ``pipe:`` command (``pipe:cat x.tar``) or any URL webdataset's ``gopen``
understands; several specs may be given as a list or joined with ``::``.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple
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


def folder_shards(folder: str | Path, what: str = "data.train_shards") -> List[str]:
    """The ``*.tar`` shards of a folder (sorted), with a log line from img2dataset's stats files.

    Raises :class:`DataError` naming the folder when it holds no tar file.
    """
    root = Path(folder)
    tars = sorted(str(p) for p in root.glob("*.tar") if p.is_file() and not p.name.startswith("."))
    if not tars:
        raise DataError(f"{what}: folder '{folder}' holds no .tar shards; check the path.")
    stats = read_stats(root)
    if stats:
        log.info("%s: %d shard(s) in %s, made by img2dataset: %d of %d samples downloaded (failed ones are "
                 "absent from the tars)", what, len(tars), folder, stats["successes"], stats["count"])
    return tars


def read_stats(folder: str | Path) -> Dict[str, int]:
    """``count`` and ``successes`` summed over a folder's ``NNNNN_stats.json`` files ({} if none)."""
    totals: Dict[str, int] = {}
    for path in sorted(Path(folder).glob("*_stats.json")):
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
            for name in ("count", "successes"):
                totals[name] = totals.get(name, 0) + int(stats[name])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable img2dataset stats file %s (%s)", path, type(err).__name__)
    return totals


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
            elif os.path.isdir(path):
                urls.extend(folder_shards(path, what))
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
