"""Dropping samples by rule (``data.filters``, ``data.min_size``) and counting the drops.

A dropped sample is a good sample a rule excludes, not a corrupt one: :class:`Dropped` names the
counter it goes to (``min_size`` or the filtered field), and each DataLoader worker keeps a
:class:`DropCounter` whose cumulative counts ride on every batch as ``batch["dropped"]`` (int64
B×K, one column per name of :func:`mmdiff.config.filter_rules.drop_names`), like ``skipped``.

Metadata filters run on the json member before the image is decoded. ``caption_len`` applies to
each caption of a sample: captions that fail it are not drawn, and a sample none of whose
captions pass is dropped.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from mmdiff.config.filter_rules import CAPTION_LEN, MIN_SIZE, MetadataFilter

log = logging.getLogger(__name__)


class Dropped(Exception):
    """A sample excluded by a rule; ``name`` is its drop counter."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


def field_value(meta: Any, path: str) -> Any:
    """The value at a dotted ``path`` of a json document, or None when absent."""
    value = meta
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def numeric_field(meta: Any, path: str) -> Optional[float]:
    """The number at a dotted ``path`` of a json document; None when absent or not a number."""
    value = field_value(meta, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def check_metadata(filters: Sequence[MetadataFilter], meta: Any) -> None:
    """Raise :class:`Dropped` for the first json filter ``meta`` fails (or lacks the field of)."""
    for f in filters:
        if f.field == CAPTION_LEN:
            continue
        x = numeric_field(meta, f.field)
        if x is None:
            raise Dropped(f.field, f"no numeric json field '{f.field}' for filter '{f.text}'")
        if not f.keeps(x):
            raise Dropped(f.field, f"{f.field}={x:g} fails filter '{f.text}'")


def choose_caption(captions: Sequence[str], filters: Sequence[MetadataFilter],
                   seed: Optional[Sequence[int]] = None) -> str:
    """One caption: those passing the ``caption_len`` filters, drawn with ``default_rng(seed)``
    when several remain and a seed is given, else the first. Raises :class:`Dropped` if none pass."""
    length_filters = [f for f in filters if f.field == CAPTION_LEN]
    kept = [c for c in captions if all(f.keeps(len(c.split())) for f in length_filters)]
    if not kept:
        failed = next(f for f in length_filters if not all(f.keeps(len(c.split())) for c in captions))
        raise Dropped(CAPTION_LEN, f"no caption passes filter '{failed.text}'")
    if len(kept) == 1 or seed is None:
        return kept[0]
    return kept[int(np.random.default_rng(list(seed)).integers(len(kept)))]


def check_size(min_size: int, original_size: Tuple[int, int]) -> None:
    """Raise :class:`Dropped` when the shorter side of (height, width) is below ``min_size``."""
    if min_size > 0 and min(original_size) < min_size:
        height, width = original_size
        raise Dropped(MIN_SIZE, f"image is {width}x{height}, its shorter side below data.min_size={min_size}")


class DropCounter:
    """Cumulative drops of one worker, per counter name."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.counts = [0] * len(self.names)

    def drop(self, err: Dropped) -> None:
        """Count one dropped sample."""
        i = self.names.index(err.name)
        self.counts[i] += 1
        if self.counts[i] == 1:
            log.info("first sample dropped by %s: %s (drops are counted in data/dropped/%s)",
                     err.name, err, err.name)

    def as_list(self) -> List[int]:
        return list(self.counts)
