"""The validation stream: one deterministic, rank-balanced pass (see :class:`ValStream`)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from mmdiff.data.buckets import BucketSet, ShapeBuffers, shape_key
from mmdiff.data.decode import CorruptSample, DecodeSpec
from mmdiff.data.filters import DropCounter, Dropped
from mmdiff.data.shards import worker_and_count
from mmdiff.data.skips import SkipCounter
from mmdiff.data.splitting import val_batches_per_rank, val_batches_per_slot, val_block
from mmdiff.data.streams import BatchStream, Item
from mmdiff.data.tario import ShardError, iter_samples
from mmdiff.data.transforms import ImageTransform
from mmdiff.errors import DataError

log = logging.getLogger(__name__)


class ValStream(BatchStream):
    """One deterministic pass over the validation shards, balanced across ranks and workers.

    ``shard_sizes`` (samples per shard, from :func:`mmdiff.data.tario.list_keys`) fixes the
    work of every (rank, worker) before anything is read; corrupt or missing samples and padding
    come out as placeholders with ``valid`` False, and so do samples the rules of ``spec`` drop.
    Centre crop, no flip, the first of several captions.

    With buckets, each slot batches its good samples shape by shape (corrupt and dropped ones are
    counted, not batched), then adds one-placeholder batches up to the batch count every slot makes
    (:func:`~mmdiff.data.splitting.val_batches_per_slot`).
    """

    def __init__(self, urls: Sequence[str], shard_sizes: Sequence[int], spec: DecodeSpec,
                 image_size: int, batch_size: int, rank: int = 0, world: int = 1,
                 num_workers: int = 0, buckets: Optional[BucketSet] = None) -> None:
        super().__init__(urls, spec, image_size, batch_size, rank, world, 0, num_workers, buckets)
        if len(shard_sizes) != len(self.urls):
            raise ValueError("one size per validation shard is needed")
        self.shard_sizes = list(shard_sizes)
        self.transform = ImageTransform(image_size)

    @property
    def total(self) -> int:
        """Samples in the validation set (good or not)."""
        return sum(self.shard_sizes)

    @property
    def shapes(self) -> int:
        """The most shapes a slot's samples come in (one without buckets)."""
        return len(self.buckets.sizes) if self.buckets else 1

    def __len__(self) -> int:
        return val_batches_per_rank(self.total, self.world, self.num_workers, self.batch_size, self.shapes)

    def _items(self, worker: int, num_workers: int, counter: SkipCounter, drops: DropCounter) -> Iterator[Item]:
        block = val_block(self.shard_sizes, self.rank, self.world, worker, num_workers)
        shapes: Dict[str, Tuple[int, ...]] = {}
        for shard_id, start, end in block.ranges:
            url = self.urls[shard_id]
            done = start
            try:
                for raw in iter_samples(url, want=lambda p, a=start, b=end: a <= p < b, stop=end):
                    if raw.pos < start:
                        continue
                    done = raw.pos + 1
                    try:
                        yield self._item(raw, self.transform, None, shapes)
                    except Dropped as err:
                        drops.drop(err)
                        yield self._placeholder(raw.key)
                    except Exception as err:
                        counter.skip(str(err) if isinstance(err, CorruptSample) else repr(err), raw.key, url)
                        yield self._placeholder(raw.key)
            except ShardError as err:
                log.warning("val rank %d worker %d: %s", self.rank, worker, err)
            for pos in range(done, end):
                counter.skip(f"sample at position {pos} is missing (the shard ended early)", url=url)
                yield self._placeholder()
        for _ in range(block.padding):
            yield self._placeholder()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker, num_workers = worker_and_count()
        counter = SkipCounter(f"val rank {self.rank} worker {worker}")
        drops = DropCounter(self.drop_names)
        if self.buckets is not None:
            yield from self._bucketed(worker, num_workers, counter, drops)
            return
        items: List[Item] = []
        for item in self._items(worker, num_workers, counter, drops):
            items.append(item)
            if len(items) == self.batch_size:
                yield self._collate(items, counter.count, worker, drops)
                items = []
        if items:
            yield self._collate(items, counter.count, worker, drops)

    def _bucketed(self, worker: int, num_workers: int, counter: SkipCounter,
                  drops: DropCounter) -> Iterator[Dict[str, Any]]:
        """The slot's batches shape by shape, padded to the common count with one-placeholder batches."""
        quota = val_batches_per_slot(self.total, self.world * max(1, num_workers), self.batch_size, self.shapes)
        waiting: ShapeBuffers[Item] = ShapeBuffers(self.batch_size)
        made = 0

        def batches(groups: List[List[Item]]) -> Iterator[Dict[str, Any]]:
            nonlocal made
            for group in groups:
                made += 1
                if made > quota:
                    raise DataError(f"validation rank {self.rank} worker {worker}: the samples come in more "
                                    f"shapes than the {self.shapes} data.buckets; make the validation shards "
                                    "with the same data.buckets.")
                yield self._collate(group, counter.count, worker, drops)

        for item in self._items(worker, num_workers, counter, drops):
            if not item["valid"]:  # counted already; the quota's padding keeps the ranks in step
                continue
            full = waiting.add(shape_key(item), item)
            if full is not None:
                yield from batches([full])
        yield from batches(waiting.drain())
        yield from batches([[self._placeholder()] for _ in range(quota - made)])
