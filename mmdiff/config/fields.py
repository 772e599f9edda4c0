"""Helpers every config section uses: choice fields, the one-line check, fields of one system."""
from __future__ import annotations

import enum
from dataclasses import field
from typing import Any, Sequence

from mmdiff.errors import ConfigError


def choice(default: enum.Enum, system: str = "") -> Any:
    """A field holding one of ``type(default)``'s values as a plain string (checked when loading);
    ``system``: the field is used by that system only (set for another, it is an error)."""
    return field(default=default.value, metadata={"choices": tuple(m.value for m in type(default)), "system": system})


def system_field(default: Any, system: str) -> Any:
    """A field only ``system`` uses (a value other than ``default`` for another system is an error)."""
    return field(default=default, metadata={"system": system})


def require(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def divides(group: int, channels: Sequence[int]) -> bool:
    """``group`` is positive and divides every (positive) entry of ``channels``."""
    return group > 0 and all(c > 0 and c % group == 0 for c in channels)
