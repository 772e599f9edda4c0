"""Caption image files with a captioning checkpoint (what ``mmdiff caption`` calls).

::

    import mmdiff
    from mmdiff.inference.caption_files import caption_files
    system = mmdiff.load("runs/demo/caption_ar/checkpoints/last.ckpt", expect="captioning")
    for result in caption_files(system, ["a.png", "b.png"], decoding="beam"):
        print(result.path, result.caption or result.error)

Images are read like the training shards read them (RGB, shorter side resized to
``data.image_size``, centre crop, [-1, 1]). An image that is missing or cannot be decoded gives a
result with ``error`` set — one sentence naming the file — and the others are still captioned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mmdiff.data.decode import DecodeSpec
from mmdiff.data.reference import usable_samples
from mmdiff.data.transforms import ImageTransform, read_image_file
from mmdiff.errors import DataError
from mmdiff.eval.caption_metrics import caption_metrics

log = logging.getLogger(__name__)


@dataclass
class CaptionResult:
    """One image's caption, or the reason it has none."""

    path: str
    caption: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def caption_files(
    system: Any,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 64,
    image_size: Optional[int] = None,
    seed: int = 0,
    **options: Any,
) -> List[CaptionResult]:
    """Caption image files in order; unreadable ones get ``error`` instead of a caption.

    ``options`` go to ``system.caption`` (``decoding``, ``steps``, ``temperature``, ``top_k``,
    ``top_p``, ``beam_size``, ``complete``, ``denoise``, ``strength``); None values are dropped.
    """
    size = int(image_size or system.cfg.data.image_size)
    options = {k: v for k, v in options.items() if v is not None}
    results = [CaptionResult(str(p)) for p in paths]
    loaded: List[Tuple[int, torch.Tensor]] = []
    for index, path in enumerate(paths):
        try:
            loaded.append((index, read_image_file(path, size)))
        except DataError as err:
            results[index].error = str(err)
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        images = torch.stack([t for _, t in chunk])
        captions = system.caption(images, seed=seed + start, **options)
        for (index, _), caption in zip(chunk, captions):
            results[index].caption = caption
    return results


def evaluate_captioner(
    system: Any,
    shards: str | Sequence[str],
    *,
    batch_size: int = 100,
    seed: int = 0,
    limit: Optional[int] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Caption every sample of ``shards`` and score against their captions (mmdiff.eval.caption_metrics).

    Returns the metrics plus ``n`` and a few ``examples`` (reference, generated).
    """
    transform = ImageTransform(int(system.cfg.data.image_size))
    spec = DecodeSpec(caption_key=str(system.cfg.data.caption_key))
    images: List[torch.Tensor] = []
    refs: List[str] = []
    for _, sample in usable_samples(shards, spec):
        if limit is not None and len(refs) >= limit:
            break
        images.append(transform(sample.image))
        refs.append(sample.caption)
    options = {k: v for k, v in options.items() if v is not None}
    preds: List[str] = []
    for start in range(0, len(refs), batch_size):
        batch = torch.stack(images[start : start + batch_size])
        preds += system.caption(batch, seed=seed + start, **options)
    metrics: Dict[str, Any] = caption_metrics(preds, refs)
    metrics["n"] = len(refs)
    metrics["examples"] = list(zip(refs, preds))[:: max(1, len(refs) // 10)][:10]
    return metrics


__all__ = ["CaptionResult", "caption_files", "evaluate_captioner"]
