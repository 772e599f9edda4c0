"""Caption metrics, retrieval metrics and the round trip, on hand-made inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmdiff.eval.caption_metrics import (
    bleu4,
    caption_metrics,
    cider_d,
    cider_d_scores,
    clip_score,
    digit_accuracy,
    exact_match,
    roundtrip_digits,
)
from mmdiff.eval.retrieval import digit_prompts, group_ids, recall_at_k, zero_shot_accuracy

REFS = [
    "a handwritten digit seven",
    "the number 3 written by hand",
    "a photo of the digit two",
    "someone wrote the number five",
    "a white nine on a black background",
]


def test_identical_captions_score_perfectly() -> None:
    assert bleu4(REFS, REFS) == pytest.approx(1.0)
    assert cider_d(REFS, REFS) == pytest.approx(10.0)
    assert exact_match(REFS, REFS) == 1.0
    m = caption_metrics(REFS, REFS)
    assert m["digit_accuracy"] == 1.0 and m["bleu4"] == pytest.approx(1.0)


def test_worse_captions_score_lower() -> None:
    preds = ["a handwritten digit one", "the number 3", "a photo of the digit two", "a dog", "nine"]
    assert 0.0 < bleu4(preds, REFS) < 1.0
    scores = cider_d_scores(preds, REFS)
    assert scores[2] == pytest.approx(10.0) and scores[3] == 0.0
    assert 0 < cider_d(preds, REFS) < 10.0
    assert exact_match(preds, REFS) == pytest.approx(0.2)
    # case, punctuation and spacing do not matter
    assert exact_match(["A  handwritten digit SEVEN!"], [REFS[0]]) == 1.0
    # several references per caption
    assert exact_match(["the digit 7"], [["a handwritten digit seven", "the digit 7"]]) == 1.0


# The worked example of NLTK's bleu_score docstrings (the BLEU paper's sentences); NLTK documents
# sentence_bleu = 0.5045... for the first pair and corpus_bleu = 0.5920... for both. Lower-casing
# (our normalize) changes no n-gram match here: "Party" only occurs where "party" matches anyway.
_H1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
_R1 = ["It is a guide to action that ensures that the military will forever heed Party commands",
       "It is the guiding principle which guarantees the military forces always being under the command of the Party",
       "It is the practical guide for the army always to heed the directions of the party"]
_H2 = "he read the book because he was interested in world history"
_R2 = ["he was interested in world history because he read the book"]


def test_bleu4_matches_the_published_worked_example() -> None:
    assert bleu4([_H1], [_R1]) == pytest.approx(0.5045666840058485, abs=1e-6)
    assert bleu4([_H1, _H2], [_R1, _R2]) == pytest.approx(0.5920778868801042, abs=1e-6)


# Four images with two references each; the expected figures are pycocoevalcap 1.2's own (the
# COCO caption evaluation: CiderScorer(n=4, sigma=6) and BleuScorer(n=4), option "closest"),
# computed once on these normalised captions. BLEU-4 differs from pycocoevalcap's only by the tiny
# count offsets it adds (1e-15 and 1e-9), far below the tolerance.
_COCO_PREDS = ["a man is riding a horse", "two dogs play in the grass", "a red car parked on the street",
               "a cat sleeping on a sofa"]
_COCO_REFS = [["a man rides a brown horse", "a person riding a horse in a field"],
              ["two dogs are playing on the grass", "dogs running in a grassy field"],
              ["a red car is parked by the road", "a small red car on a city street"],
              ["a cat is asleep on the couch", "a grey cat sleeping on a sofa"]]


def test_cider_d_and_bleu4_equal_the_coco_caption_evaluation() -> None:
    per_image = cider_d_scores(_COCO_PREDS, _COCO_REFS)
    expected = [2.3089794505031067, 1.6871184729237538, 2.4800146183976612, 4.120908198686593]
    assert per_image == pytest.approx(expected, abs=1e-9)
    assert cider_d(_COCO_PREDS, _COCO_REFS) == pytest.approx(2.649255185127779, abs=1e-9)
    assert bleu4(_COCO_PREDS, _COCO_REFS) == pytest.approx(0.36253155817383337, abs=1e-7)


def test_cider_of_a_single_image_is_zero() -> None:
    # CIDEr-D's IDF comes from the evaluated set: one image means every n-gram is everywhere.
    assert cider_d(["a b c"], ["a b c"]) == 0.0


def test_digit_accuracy_reads_words_and_numerals() -> None:
    preds = ["a handwritten digit seven", "the number 3 written by hand", "a blurry 8", "a cat"]
    assert digit_accuracy(preds, [7, 3, 9, 1]) == 0.5
    assert digit_accuracy(preds, ["the digit 7", "three", "a white eight", "one"]) == 0.75
    # references that name no digit are left out
    assert digit_accuracy(preds[:2], ["a cat", "the digit 3"]) == 1.0
    assert digit_accuracy(["x"], ["a cat"]) is None
    assert digit_accuracy(["the 10 digits"], [1]) == 0.0  # "10" is not a digit numeral
    with pytest.raises(ValueError):
        digit_accuracy(["a"], [1, 2])


def test_clip_score() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    assert clip_score(a, b).tolist() == [100.0, 0.0]


def test_recall_and_groups() -> None:
    image = torch.eye(4)
    text = torch.eye(4)[[0, 1, 3, 2]]  # pairs 2 and 3 swapped
    assert recall_at_k(image, text, k=1) == (0.5, 0.5)
    assert recall_at_k(image, text, k=2)[0] >= 0.5
    groups = group_ids(["a", "b", "c", "C "])  # the swapped captions are the same text
    assert groups.tolist() == [0, 1, 2, 2]
    assert recall_at_k(image, text, k=1, groups=groups) == (1.0, 1.0)


def test_zero_shot_accuracy() -> None:
    classes = torch.eye(3)
    images = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 1.0], [1.0, 0.0, 0.0]])
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 2, 1])) == pytest.approx(2 / 3)
    assert digit_prompts()[7] == "a handwritten digit seven"
    assert digit_prompts("the digit {numeral}")[3] == "the digit 3"


class DigitSampler:
    """'Generates' real scikit-learn digits of the prompted class (32×32, [-1, 1])."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        self.images, self.labels = d.images, d.target

    def sample(self, prompts, seed=0, **_):
        from mmdiff.data.digits import digit_from_caption

        rng = np.random.default_rng(seed)
        out = []
        for p in prompts:
            idx = rng.choice(np.flatnonzero(self.labels == digit_from_caption(p)))
            x = torch.tensor(self.images[idx], dtype=torch.float32) / 8.0 - 1.0
            out.append(torch.nn.functional.interpolate(x[None, None], size=32, mode="nearest")[0].expand(3, -1, -1))
        return torch.stack(out)


class JudgeCaptioner:
    """Names the digit the SVC judge sees — except sevens, which it calls ones."""

    def caption(self, images, seed=0, **_):
        from mmdiff.data.digits import DIGIT_WORDS
        from mmdiff.eval.digit_judge import classify_digits

        return [f"a handwritten digit {DIGIT_WORDS[1 if d == 7 else int(d)]}" for d in classify_digits(images)]


def test_roundtrip_with_stand_ins(tmp_path) -> None:
    result = roundtrip_digits(DigitSampler(), JudgeCaptioner(), n_per_digit=3, seed=0, out=tmp_path)
    assert result.image_accuracy > 0.9
    assert result.per_digit[7] == 0.0
    assert 0.8 <= result.accuracy <= 0.9
    assert "round trip" in result.summary()
    assert (tmp_path / "roundtrip.json").is_file() and (tmp_path / "roundtrip_grid.png").is_file()
