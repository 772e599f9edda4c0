"""Image sizes listed in a config (``data.buckets.sizes``, ``sampling.sizes``): one spelling for all.

Each entry is either a ``"WIDTHxHEIGHT"`` string (``"832x1216"``, also bare on the command line:
``[832x1216,1024x1024]``) or a ``[WIDTH, HEIGHT]`` pair; both mean the same (width, height).
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmdiff.config.fields import require

Size = Tuple[int, int]  # (width, height)


def parse_size(value: Any) -> Optional[Size]:
    """(width, height) of ``"WIDTHxHEIGHT"`` or ``[WIDTH, HEIGHT]`` with positive integer sides, else None."""
    if isinstance(value, str):
        parts = value.lower().split("x")
    elif isinstance(value, (list, tuple, ListConfig)) and not isinstance(value, DictConfig):
        parts = list(value)
    else:
        return None
    if len(parts) != 2:
        return None
    sides = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            return None  # a float, a nested list, a mapping: not a pixel count
        text = str(part).strip()
        if not text.isdigit() or int(text) < 1:
            return None
        sides.append(int(text))
    return sides[0], sides[1]


def parse_sizes(values: Iterable[Any], key: str) -> List[Size]:
    """Every entry of the list at ``key`` as (width, height), in order; a ConfigError naming the key and
    the first entry that is neither spelling."""
    sizes = []
    for value in values:
        size = parse_size(value)
        require(size is not None,
                f"{key} entry {_shown(value)} is not a size; write 'WIDTHxHEIGHT' or [WIDTH, HEIGHT] with "
                "positive whole numbers of pixels, e.g. '768x512' or [768, 512].")
        sizes.append(size)
    return sizes


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value)
