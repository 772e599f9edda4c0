"""A look at the first training samples before training: would the drop rules leave anything?

:func:`probe_rules` decodes the first ``n`` samples of the training shards with the rules of a
:class:`~mmdiff.data.decode.DecodeSpec` (``data.filters``, ``data.min_size``). It warns once per
filter whose field some probed samples lack (with the counts and the fields they do have), and
raises :class:`~mmdiff.errors.DataError` in one sentence when the rules drop every probed sample
— instead of a stream that skips for ever.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Sequence

from mmdiff.config.filter_rules import CAPTION_LEN
from mmdiff.data.decode import CorruptSample, DecodeSpec, decode_json, decode_sample
from mmdiff.data.filters import Dropped, numeric_field
from mmdiff.data.tario import RawSample, ShardError, iter_samples
from mmdiff.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ProbeReport:
    """What the rules did to the probed samples."""

    probed: int = 0
    kept: int = 0
    corrupt: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)  # per drop counter
    missing: Dict[str, int] = field(default_factory=dict)  # per filtered json field: samples without a number there
    fields_seen: Counter = field(default_factory=Counter)  # top-level json fields of the probed samples


def probe_rules(urls: Sequence[str], spec: DecodeSpec, n: int = 1000) -> ProbeReport:
    """Apply ``spec``'s rules to the first ``n`` samples of ``urls`` (in order); warn and raise as
    the module docstring says. Nothing is read when ``spec`` has no rules."""
    report = ProbeReport()
    if not spec.filters and spec.min_size <= 0:
        return report
    fields = sorted({f.field for f in spec.filters if f.field != CAPTION_LEN})
    for url in urls:
        try:
            for raw in iter_samples(url):
                _probe_one(raw, spec, fields, report)
                if report.probed >= n:
                    break
        except ShardError as err:
            log.warning("probing the data rules: %s", err)
        if report.probed >= n:
            break
    _report(report, spec)
    return report


def _probe_one(raw: RawSample, spec: DecodeSpec, fields: Sequence[str], report: ProbeReport) -> None:
    report.probed += 1
    meta = None
    if "json" in raw.members:
        try:
            meta = decode_json(raw.members["json"])
        except CorruptSample:
            meta = None
    if isinstance(meta, dict):
        report.fields_seen.update(meta.keys())
    for name in fields:
        if numeric_field(meta, name) is None:
            report.missing[name] = report.missing.get(name, 0) + 1
    try:
        decode_sample(raw, spec)
        report.kept += 1
    except Dropped as err:
        report.dropped[err.name] = report.dropped.get(err.name, 0) + 1
    except Exception:  # corrupt samples are the stream's business (skipped and counted there)
        report.corrupt += 1


def _report(report: ProbeReport, spec: DecodeSpec) -> None:
    seen = ", ".join(sorted(report.fields_seen)) or "none"
    for f in spec.filters:
        lacking = report.missing.pop(f.field, 0)
        if lacking:
            log.warning("data.filters '%s': %d of the first %d training samples have no numeric json field "
                        "'%s' and are dropped (json fields seen: %s)", f.text, lacking, report.probed, f.field, seen)
    total = sum(report.dropped.values())
    if total and report.kept == 0:
        counts = ", ".join(f"{name}: {count}" for name, count in sorted(report.dropped.items()))
        raise DataError(
            f"data.filters / data.min_size drop all {total} usable samples of the first {report.probed} "
            f"training samples ({counts}); loosen them or check the shards."
        )
    if total:
        log.info("data rules drop %d of the first %d training samples (%s)", total, report.probed,
                 ", ".join(f"{k}: {v}" for k, v in sorted(report.dropped.items())))
