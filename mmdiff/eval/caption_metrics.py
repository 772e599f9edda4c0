"""Caption metrics: BLEU-4, CIDEr-D, exact match, digit accuracy, CLIP score — and the round trip.

Where each comes from:

* **BLEU-4** — torchmetrics' ``bleu_score``: corpus BLEU of Papineni et al. (clipped n-gram
  counts summed over the corpus, uniform 1–4-gram weights, brevity penalty against the closest
  reference length), the definition of NLTK's unsmoothed ``corpus_bleu``; tested against NLTK's
  published worked example. pycocoevalcap's BLEU (what COCO captioning papers report) is the same
  formula except that it adds 1e-15 to each matched and 1e-9 to each total n-gram count, so a
  caption set with no matching 4-gram scores a small positive number there and 0 here. torchmetrics is already installed with Lightning.
* **CIDEr-D** — torchmetrics (1.9) has no CIDEr, and pycocoevalcap is not a dependency: its
  BLEU/CIDEr scorers are pure Python but its PTB tokenizer (and METEOR/SPICE) need Java, and the
  package pulls in pycocotools. CIDEr-D is ~60 lines, so :func:`cider_d` follows pycocoevalcap's
  ``cider_scorer.py`` line by line instead (document frequencies over the evaluated corpus' references,
  TF-IDF n-gram vectors for n = 1..4, clipped counts, Gaussian length penalty σ = 6, × 10), including its
  quirk of measuring length in bigrams: the COCO caption evaluation's "CIDEr" (which is CIDEr-D),
  what captioning papers report. Like there, the IDF comes from the evaluated set: with a
  single image every n-gram is in every "document" and the score is 0.
* Both run on lower-cased text with punctuation removed and whitespace tokens — a stand-in for the
  PTB tokenizer of the COCO toolkit, so absolute numbers are close to but not identical with it.
* **exact match** — the normalised caption equals one of the references.
* **digit accuracy** — the digit a caption names (word or numeral, ``digit_from_caption``) equals
  the label, or the digit the reference names; rows whose reference names no digit are left out.
* **CLIP score** — ``100 · max(cos(image, text), 0)`` of CLIP embeddings (torchmetrics'
  definition); only meaningful with a trained CLIP.

:func:`roundtrip_digits` is the cycle-consistency figure: sample "a handwritten digit {word}" with
any object with ``sample(prompts, seed=...)``, caption the images with any object with
``caption(images, ...)``, and count how often the caption names the prompted digit.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor

from mmdiff.data.digits import DIGIT_WORDS, digit_from_caption
from mmdiff.eval.digit_judge import classify_digits
from mmdiff.eval.generative import generate
from mmdiff.io.atomic import write_text_atomic
from mmdiff.io.images import grid, save_png

log = logging.getLogger(__name__)

References = Union[Sequence[str], Sequence[Sequence[str]]]

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, single spaces."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _as_lists(references: References) -> List[List[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check(preds: Sequence[str], refs: List[List[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} captions but {len(refs)} reference sets; they must pair up.")


# ------------------------------------------------------------------------------------ BLEU
def bleu4(preds: Sequence[str], references: References) -> float:
    """Corpus BLEU-4 (torchmetrics) of captions against one or more references each."""
    # Imported here: torchmetrics' text metrics are slow to import; only BLEU needs them.
    from torchmetrics.functional.text import bleu_score

    refs = _as_lists(references)
    _check(preds, refs)
    if not preds:
        return 0.0
    value = bleu_score(
        [normalize(p) for p in preds], [[normalize(r) for r in rs] for rs in refs], n_gram=4
    )
    return float(value)


# ---------------------------------------------------------------------------------- CIDEr-D
_N = 4
_SIGMA = 6.0


def _ngrams(text: str, n: int = _N) -> Counter:
    words = text.split()
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _vector(counts: Counter, df: Mapping[tuple, float], ref_len: float) -> Tuple[List[Dict], List[float], int]:
    vec: List[Dict[tuple, float]] = [defaultdict(float) for _ in range(_N)]
    norm = [0.0] * _N
    length = 0
    for ngram, tf in counts.items():
        n = len(ngram) - 1
        weight = tf * (ref_len - math.log(max(1.0, df.get(ngram, 0.0))))
        vec[n][ngram] = weight
        norm[n] += weight * weight
        if n == 1:  # pycocoevalcap counts the length in bigrams; kept for comparable numbers
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _sim(hyp: Tuple, ref: Tuple) -> List[float]:
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    delta = float(lh - lr)
    val = [0.0] * _N
    for n in range(_N):
        for ngram, weight in vh[n].items():
            val[n] += min(weight, vr[n].get(ngram, 0.0)) * vr[n].get(ngram, 0.0)
        if nh[n] != 0 and nr[n] != 0:
            val[n] /= nh[n] * nr[n]
        val[n] *= math.exp(-(delta * delta) / (2 * _SIGMA * _SIGMA))
    return val


def cider_d_scores(preds: Sequence[str], references: References) -> List[float]:
    """Per-caption CIDEr-D (IDF from the references of the whole set; see the module docstring)."""
    refs = _as_lists(references)
    _check(preds, refs)
    ref_counts = [[_ngrams(normalize(r)) for r in rs] for rs in refs]
    df: Counter = Counter()
    for counts in ref_counts:
        df.update(set(ng for c in counts for ng in c))
    ref_len = math.log(float(len(refs))) if refs else 0.0
    scores = []
    for pred, counts in zip(preds, ref_counts):
        hyp = _vector(_ngrams(normalize(pred)), df, ref_len)
        total = [0.0] * _N
        for c in counts:
            for n, v in enumerate(_sim(hyp, _vector(c, df, ref_len))):
                total[n] += v
        scores.append(sum(total) / _N / max(1, len(counts)) * 10.0)
    return scores


def cider_d(preds: Sequence[str], references: References) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_scores` (0 for an empty set)."""
    scores = cider_d_scores(preds, references)
    return sum(scores) / len(scores) if scores else 0.0


# -------------------------------------------------------------------------- the simple ones
def exact_match(preds: Sequence[str], references: References) -> float:
    """Fraction of captions equal (after :func:`normalize`) to one of their references."""
    refs = _as_lists(references)
    _check(preds, refs)
    if not preds:
        return 0.0
    hits = sum(normalize(p) in {normalize(r) for r in rs} for p, rs in zip(preds, refs))
    return hits / len(preds)


def digit_accuracy(
    preds: Sequence[str], targets: Sequence[Union[int, str, None]]
) -> Optional[float]:
    """Fraction of captions naming the right digit; ``targets`` are labels or reference captions.

    Targets that name no digit (None, or a caption without one) are left out; None when none is left.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} captions but {len(targets)} targets; they must pair up.")
    pairs = []
    for pred, target in zip(preds, targets):
        label = digit_from_caption(target) if isinstance(target, str) else target
        if label is not None:
            pairs.append(digit_from_caption(pred) == int(label))
    return sum(pairs) / len(pairs) if pairs else None


def clip_score(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Per-pair CLIP score ``100 · max(cos, 0)`` (B,) of paired image and text embeddings."""
    cos = (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)
    return 100.0 * cos.clamp(min=0)


def caption_metrics(preds: Sequence[str], references: References) -> Dict[str, float]:
    """``bleu4``, ``cider_d``, ``exact_match`` and (when references name digits) ``digit_accuracy``."""
    refs = _as_lists(references)
    out = {
        "bleu4": bleu4(preds, refs),
        "cider_d": cider_d(preds, refs),
        "exact_match": exact_match(preds, refs),
    }
    digits = digit_accuracy(preds, [rs[0] if rs else None for rs in refs])
    if digits is not None:
        out["digit_accuracy"] = digits
    return out


# ------------------------------------------------------------------------------ round trip
@dataclass
class RoundtripResult:
    """Cycle consistency of text → image → text on the ten digit prompts.

    ``accuracy``: captions naming the prompted digit. ``image_accuracy``: samples an independent
    digit classifier (the SVC of ``mmdiff eval digits``) reads as the prompted digit;
    ``caption_vs_judge``: captions naming the digit the classifier reads (the captioner's accuracy
    on these samples, whatever the generator drew).
    """

    accuracy: float
    image_accuracy: float
    caption_vs_judge: float
    per_digit: Dict[int, float]
    n_per_digit: int
    examples: List[Tuple[str, str]] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        digits = " ".join(f"{d}:{a:.2f}" for d, a in sorted(self.per_digit.items()))
        return (
            f"round trip: caption names the prompted digit {self.accuracy:.3f} over "
            f"{10 * self.n_per_digit} samples (images judged correct {self.image_accuracy:.3f}, "
            f"caption agrees with the judge {self.caption_vs_judge:.3f}) — {digits}"
        )


def roundtrip_digits(
    sampler: Any,
    captioner: Any,
    *,
    n_per_digit: int = 10,
    seed: int = 0,
    batch_size: int = 100,
    sample_options: Optional[Mapping[str, Any]] = None,
    caption_options: Optional[Mapping[str, Any]] = None,
    prompt: str = "a handwritten digit {word}",
    out: Optional[str | Path] = None,
) -> RoundtripResult:
    """Sample ``n_per_digit`` images per digit prompt, caption them, score against the prompted digit.

    ``sampler.sample(prompts, seed=..., **sample_options) -> B×3×H×W`` in [-1, 1];
    ``captioner.caption(images, seed=..., **caption_options) -> [str]``.
    """
    if n_per_digit <= 0:
        raise ValueError(f"n_per_digit must be positive, got {n_per_digit}.")
    s_opts = {k: v for k, v in dict(sample_options or {}).items() if v is not None}
    c_opts = {k: v for k, v in dict(caption_options or {}).items() if v is not None}
    prompts = [prompt.format(word=w, numeral=str(d)) for d, w in enumerate(DIGIT_WORDS)]
    images = generate(sampler, prompts, n_per_digit, batch_size, seed, **s_opts)
    captions: List[str] = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        captions += list(captioner.caption(chunk, seed=seed + start, **c_opts))
    truth = [d for d in range(10) for _ in range(n_per_digit)]
    named = [digit_from_caption(c) for c in captions]
    judged = [int(j) for j in classify_digits(images)]
    hits = [n == t for n, t in zip(named, truth)]
    per_digit = {d: sum(hits[d * n_per_digit : (d + 1) * n_per_digit]) / n_per_digit for d in range(10)}
    result = RoundtripResult(
        accuracy=sum(hits) / len(hits),
        image_accuracy=sum(j == t for j, t in zip(judged, truth)) / len(truth),
        caption_vs_judge=sum(n == j for n, j in zip(named, judged)) / len(truth),
        per_digit=per_digit,
        n_per_digit=n_per_digit,
        examples=[(prompts[t], c) for t, c in zip(truth, captions)][:: max(1, n_per_digit)],
        settings={"seed": seed, **s_opts, **c_opts},
    )
    if out is not None:
        out_dir = Path(out)
        save_png(grid(images, nrow=n_per_digit), out_dir / "roundtrip_grid.png")
        rows = [{"prompt": prompts[t], "caption": c, "judge": j} for t, c, j in zip(truth, captions, judged)]
        write_text_atomic(out_dir / "roundtrip.json", json.dumps({**asdict(result), "rows": rows}, indent=2))
    return result


__all__ = [
    "normalize",
    "bleu4",
    "cider_d",
    "cider_d_scores",
    "exact_match",
    "digit_accuracy",
    "clip_score",
    "caption_metrics",
    "RoundtripResult",
    "roundtrip_digits",
]
