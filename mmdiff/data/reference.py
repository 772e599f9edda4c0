"""Reference images for distribution metrics (FID/KID): the first N usable samples of shards."""
from __future__ import annotations

import logging
from typing import List, Sequence, Tuple

import torch

from mmdiff.data.decode import CorruptSample, DecodeSpec, decode_sample
from mmdiff.data.shards import expand_shards
from mmdiff.data.tario import iter_samples
from mmdiff.data.transforms import ImageTransform
from mmdiff.errors import DataError

log = logging.getLogger(__name__)


def read_reference(
    specs: str | Sequence[str], image_size: int, limit: int, caption_key: str = "txt"
) -> Tuple[torch.Tensor, List[str]]:
    """Up to ``limit`` images (N×3×S×S in [-1, 1], resized and centre-cropped) and captions,
    in shard order; corrupt samples are skipped with a log line."""
    transform = ImageTransform(image_size)
    spec = DecodeSpec(caption_key=caption_key)
    images: List[torch.Tensor] = []
    captions: List[str] = []
    for url in expand_shards(specs, what="--reference"):
        for raw in iter_samples(url):
            if len(images) >= limit:
                break
            try:
                decoded = decode_sample(raw, spec)
            except CorruptSample as err:
                log.warning("skipping reference sample %s in %s: %s", raw.key, url, err)
                continue
            images.append(transform(decoded.image))
            captions.append(decoded.caption)
    if len(images) < 2:
        raise DataError(f"the reference shards {specs} hold fewer than 2 usable images.")
    return torch.stack(images), captions


__all__ = ["read_reference"]
