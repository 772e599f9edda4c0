"""``data.filters``: metadata filters such as ``"aesthetic >= 5"``, parsed once when the config loads.

A filter is ``FIELD OP NUMBER`` with OP one of ``>= <= > < == !=``. FIELD names a (possibly dotted)
numeric field of the sample's json member, or ``caption_len``: the caption's number of
whitespace-separated words. Torch-free: the config check parses every filter, the data streams
apply them (:mod:`mmdiff.data.filters`).
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from mmdiff.errors import ConfigError

#: The field that counts the caption's words instead of reading the json member.
CAPTION_LEN = "caption_len"
#: The drop counter of ``data.min_size``.
MIN_SIZE = "min_size"

OPERATORS: Dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
    "==": operator.eq, "!=": operator.ne,
}
_SYNTAX = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*")


@dataclass(frozen=True)
class MetadataFilter:
    """Keep a sample when ``field op value`` holds (a sample lacking the field is dropped)."""

    field: str
    op: str
    value: float
    text: str

    def keeps(self, x: float) -> bool:
        """Whether a sample whose field holds ``x`` is kept."""
        return OPERATORS[self.op](x, self.value)


def parse_filter(text: str) -> MetadataFilter:
    """``"aesthetic >= 5"`` → :class:`MetadataFilter`; a one-sentence :class:`ConfigError` otherwise."""
    match = _SYNTAX.fullmatch(str(text))
    if match is None:
        raise ConfigError(
            f"data.filters entry '{text}' is not 'FIELD OP NUMBER' with OP one of "
            f"{' '.join(OPERATORS)}, e.g. 'aesthetic >= 5'."
        )
    field, op, raw = match.groups()
    if field == MIN_SIZE:
        raise ConfigError(f"data.filters entry '{text}' filters on 'min_size'; set data.min_size instead.")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"data.filters entry '{text}' compares with '{raw}', which is not a number.") from None
    if not math.isfinite(value):
        raise ConfigError(f"data.filters entry '{text}' compares with '{raw}'; use a finite number.")
    return MetadataFilter(field, op, value, str(text).strip())


def parse_filters(texts: Sequence[str]) -> List[MetadataFilter]:
    """Every entry of ``data.filters`` parsed, in order."""
    return [parse_filter(t) for t in texts]


def drop_names(filters: Sequence[MetadataFilter], min_size: int) -> List[str]:
    """The drop counters these rules need, in a fixed order: ``min_size`` (when on), then each
    filtered field once (two filters on one field share its counter)."""
    names = [MIN_SIZE] if min_size > 0 else []
    for f in filters:
        if f.field not in names:
            names.append(f.field)
    return names
