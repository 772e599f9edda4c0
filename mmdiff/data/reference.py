"""Shard samples read outside training, in shard order: reference images for distribution metrics
(FID/KID), captioner and unCLIP evaluation sets."""
from __future__ import annotations

import logging
from typing import Iterator, List, Sequence, Tuple

import torch

from mmdiff.data.decode import CorruptSample, Decoded, DecodeSpec, decode_sample
from mmdiff.data.shards import expand_shards
from mmdiff.data.tario import RawSample, iter_samples
from mmdiff.data.transforms import ImageTransform
from mmdiff.errors import DataError

log = logging.getLogger(__name__)


def usable_samples(specs: str | Sequence[str], spec: DecodeSpec, what: str = "shards"
                   ) -> Iterator[Tuple[RawSample, Decoded]]:
    """``(raw, decoded)`` for every sample of the shards, in order; corrupt ones are skipped with a
    log line (``what`` names the option the shards came from in errors)."""
    for url in expand_shards(specs, what=what):
        for raw in iter_samples(url):
            try:
                yield raw, decode_sample(raw, spec)
            except CorruptSample as err:
                log.warning("skipping sample %s in %s: %s", raw.key, url, err)


def read_reference(
    specs: str | Sequence[str], image_size: int, limit: int, caption_key: str = "txt"
) -> Tuple[torch.Tensor, List[str]]:
    """Up to ``limit`` images (N×3×S×S in [-1, 1], resized and centre-cropped) and captions,
    in shard order; corrupt samples are skipped with a log line."""
    transform = ImageTransform(image_size)
    spec = DecodeSpec(caption_key=caption_key)
    images: List[torch.Tensor] = []
    captions: List[str] = []
    for _, decoded in usable_samples(specs, spec, what="--reference"):
        if len(images) >= limit:
            break
        images.append(transform(decoded.image))
        captions.append(decoded.caption)
    if len(images) < 2:
        raise DataError(f"the reference shards {specs} hold fewer than 2 usable images.")
    return torch.stack(images), captions


__all__ = ["read_reference", "usable_samples"]
