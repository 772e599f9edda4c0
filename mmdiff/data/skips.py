"""Counting skipped samples without stopping (and without webdataset's 0.5 s sleep per error).

Each DataLoader worker owns a :class:`SkipCounter` for one pass over its data; every batch it makes
carries the counter's value so far (``batch["skipped"]``) and the worker id (``batch["worker"]``).
Because counts are cumulative per worker, the total of a pass is the sum over workers of the last
(largest) value seen — which is what :class:`SkipTally` computes from batches.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Mapping

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts skipped samples of one worker; warns for the first ``verbose`` then every ``every``-th."""

    def __init__(self, where: str, verbose: int = 10, every: int = 1000) -> None:
        self.where = where
        self.verbose = verbose
        self.every = every
        self.count = 0

    def skip(self, reason: str, key: str = "", url: str = "") -> None:
        """Count one skipped sample (or unreadable shard) and log a warning about it."""
        self.count += 1
        if self.count <= self.verbose or self.count % self.every == 0:
            what = f" sample '{key}' of {url}" if key else (f" {url}" if url else "")
            more = " (further skips are logged every %d)" % self.every if self.count == self.verbose else ""
            log.warning("%s: skipped%s: %s [%d skipped so far]%s", self.where, what, reason, self.count, more)

    def handler(self, exn: BaseException) -> bool:
        """A webdataset ``handler=``: count and warn, then continue (returns True; never sleeps)."""
        self.skip(f"{type(exn).__name__}: {str(exn)[:200]}")
        return True


class SkipTally:
    """Per-pass skip total from batches: max of ``skipped`` per worker, summed over workers."""

    def __init__(self) -> None:
        self.per_worker: Dict[int, int] = {}

    def update(self, batch: Mapping[str, Any]) -> None:
        """Fold in one batch (batches without ``skipped``/``worker`` are ignored)."""
        skipped, worker = batch.get("skipped"), batch.get("worker")
        if skipped is None or worker is None or len(skipped) == 0:
            return
        wid = int(worker[0])
        self.per_worker[wid] = max(self.per_worker.get(wid, 0), int(skipped.max()))

    @property
    def total(self) -> int:
        return sum(self.per_worker.values())

    def reset(self) -> None:
        self.per_worker.clear()


def count_skipped(batches: Iterable[Mapping[str, Any]]) -> int:
    """Total samples skipped in one pass of a dataloader, e.g. ``count_skipped(dm.val_dataloader())``."""
    tally = SkipTally()
    for batch in batches:
        tally.update(batch)
    return tally.total
