"""Captions of the digits demo: templates that name a digit as a word or a numeral, and their parser.

Light on dependencies (no torch) so eval code can import it to read the digit back from a prompt.
"""
from __future__ import annotations

import random
import re
from typing import Optional, Union

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {word} → "seven", {numeral} → "7". No template mentions any other number.
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {numeral} written by hand",
    "a photo of the digit {word}",
    "a white {word} on a black background",
    "a blurry handwritten {numeral}",
    "the digit {numeral}",
    "a scanned image of the number {word}",
    "someone wrote the number {word}",
)

Rng = Union[random.Random, np.random.Generator]

_WORD_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)
_NUMERAL_RE = re.compile(r"(?<![\d.])([0-9])(?![\d.])")


def _pick(rng: Rng, n: int) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    return rng.randrange(n)


def caption_for(digit: int, rng: Rng) -> str:
    """A random caption (one of :data:`CAPTION_TEMPLATES`) naming ``digit`` (0..9)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    template = CAPTION_TEMPLATES[_pick(rng, len(CAPTION_TEMPLATES))]
    return template.format(word=DIGIT_WORDS[int(digit)], numeral=str(int(digit)))


def digit_from_caption(caption: str) -> Optional[int]:
    """The digit a caption names (as a word or a single numeral), or None if it names none."""
    match = _WORD_RE.search(caption)
    if match:
        return DIGIT_WORDS.index(match.group(1).lower())
    match = _NUMERAL_RE.search(caption)
    if match:
        return int(match.group(1))
    return None
