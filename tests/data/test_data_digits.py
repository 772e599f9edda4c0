"""Digit captions: every template names the digit, and the parser reads it back."""
from __future__ import annotations

import random

import numpy as np
import pytest

from mmdiff.data.digits import CAPTION_TEMPLATES, DIGIT_WORDS, caption_for, digit_from_caption


def test_at_least_five_templates_and_ten_words() -> None:
    assert len(CAPTION_TEMPLATES) >= 5 and len(DIGIT_WORDS) == 10


@pytest.mark.parametrize("template", CAPTION_TEMPLATES)
def test_every_template_parses_back(template: str) -> None:
    for d in range(10):
        caption = template.format(word=DIGIT_WORDS[d], numeral=str(d))
        assert digit_from_caption(caption) == d, caption


def test_caption_for_uses_both_rng_kinds_and_varies() -> None:
    captions = {caption_for(7, random.Random(i)) for i in range(40)}
    captions |= {caption_for(7, np.random.default_rng(i)) for i in range(40)}
    assert len(captions) >= 5
    assert all(digit_from_caption(c) == 7 for c in captions)
    assert digit_from_caption("a cat on a mat") is None
    with pytest.raises(ValueError):
        caption_for(10, random.Random(0))
