"""Aspect-ratio buckets at run time: which bucket an image goes to, and batching by shape (torch-free).

The bucket set comes from ``data.buckets`` (:mod:`mmdiff.config.bucket_spec`). An image goes to the
bucket nearest its aspect ratio in log space (a 2:1 and a 1:2 image are equally far from a square),
ties to the earlier bucket in the set's order, so the choice depends on the image's size alone.

:class:`ShapeBuffers` keeps one buffer per item shape and says when one holds a full batch; the
streams key it by the shape of what they batch (the image, or the arrays of precomputed shards), so
any data whose items differ in shape comes out in one-shape batches.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Generic, Hashable, List, Optional, Sequence, Tuple, TypeVar

from omegaconf import DictConfig

from mmdiff.config.bucket_spec import Size, bucket_sizes, check_buckets

T = TypeVar("T")


class BucketSet:
    """A fixed list of (width, height) buckets and the nearest-aspect assignment."""

    def __init__(self, sizes: Sequence[Size]) -> None:
        if not sizes:
            raise ValueError("a bucket set needs at least one size")
        self.sizes: Tuple[Size, ...] = tuple((int(w), int(h)) for w, h in sizes)
        self._log_aspects = [math.log(w / h) for w, h in self.sizes]

    @classmethod
    def from_config(cls, data_cfg: DictConfig) -> Optional["BucketSet"]:
        """The buckets of a ``data:`` section, or None when bucketing is off (a bad spec: ConfigError)."""
        check_buckets(data_cfg.buckets, int(data_cfg.image_size))
        sizes = bucket_sizes(data_cfg.buckets, int(data_cfg.image_size))
        return cls(sizes) if sizes else None

    def index(self, height: int, width: int) -> int:
        """Index of the bucket nearest the aspect ratio of a ``height``×``width`` image."""
        target = math.log(width / height)
        distances = [abs(a - target) for a in self._log_aspects]
        return distances.index(min(distances))

    def nearest(self, height: int, width: int) -> Size:
        """(width, height) of the bucket of a ``height``×``width`` image."""
        return self.sizes[self.index(height, width)]

    @property
    def max_side(self) -> int:
        """The longest side of any bucket (what a reduced-scale JPEG decode must still cover)."""
        return max(max(s) for s in self.sizes)

    @property
    def squarest(self) -> Size:
        """The bucket nearest a square (where placeholders without an image go)."""
        return self.nearest(1, 1)

    def describe(self) -> List[List[int]]:
        """The sizes as plain lists (for data positions and logs)."""
        return [list(s) for s in self.sizes]


class ShapeBuffers(Generic[T]):
    """Per-shape buffers of pending items; :meth:`add` returns a full batch when one fills.

    Buffers keep the order items arrived in, and the batch that completes is always the buffer the
    last item went to, so the batches are a pure function of the item order.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._buffers: Dict[Hashable, List[T]] = {}

    def add(self, shape: Hashable, item: T) -> Optional[List[T]]:
        """Buffer ``item`` under ``shape``; the whole buffer, emptied, once it holds a batch."""
        buffer = self._buffers.setdefault(shape, [])
        buffer.append(item)
        if len(buffer) < self.batch_size:
            return None
        del self._buffers[shape]
        return buffer

    def pending(self) -> List[T]:
        """Every buffered item, buffer by buffer in the order the buffers were opened."""
        return [item for buffer in self._buffers.values() for item in buffer]

    def drain(self) -> List[List[T]]:
        """The partial batches left (one per shape, in opening order); the buffers are emptied."""
        batches = list(self._buffers.values())
        self._buffers = {}
        return batches

    def __len__(self) -> int:
        return sum(len(b) for b in self._buffers.values())


def shape_key(item: Dict[str, Any]) -> Tuple[Any, ...]:
    """The shape an item is batched by: its image's, else its arrays' (precomputed latents)."""
    image = item.get("image")
    if image is not None:
        return ("image", tuple(image.shape))
    return tuple((name, tuple(array.shape)) for name, array in sorted(item.get("arrays", {}).items()))
