"""The two IterableDatasets behind :class:`~mmdiff.data.datamodule.ShardDataModule`.

Both yield ready-made batches (use them with ``DataLoader(batch_size=None)``)::

    {"image":   float32 B×3×H×W in [-1, 1]   (absent when data.load_images is false),
     "caption": list of B str,
     "key":     list of B str                 (the webdataset __key__),
     NAME:      float B×...  for each NAME in data.array_keys (from NAME.npy members),
     "valid":   bool B        (False only for validation placeholders: padding or a corrupt sample),
     "skipped": int64 B       (samples this worker skipped so far: since its training stream
                               started, or in this validation pass; all equal),
     "worker":  int64 B       (DataLoader worker id that made the batch; all equal)}

* :class:`TrainStream` — endless, resampled, seeded; exactly ``steps_per_epoch`` batches per rank
  per pass (epoch), continuing one stream per worker; corrupt samples are skipped and counted.
* :class:`ValStream` — finite, deterministic, rank-balanced; corrupt samples become flagged
  placeholders (``valid`` False) so that every rank makes the same number of batches.

See :mod:`mmdiff.data.splitting` for who reads what.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset

from mmdiff.data.decode import CorruptSample, DecodeSpec, decode_sample
from mmdiff.data.shards import worker_and_count
from mmdiff.data.skips import SkipCounter
from mmdiff.data.splitting import (
    TrainSlot,
    batches_for_worker,
    train_slot,
    val_batches_per_rank,
    val_block,
)
from mmdiff.data.tario import RawSample, ShardError, iter_samples
from mmdiff.data.transforms import ImageTransform
from mmdiff.errors import DataError

log = logging.getLogger(__name__)

Item = Dict[str, Any]


def seed_sequence(seed: int, rank: int, worker: int, epoch: int) -> np.random.SeedSequence:
    """The seed of one (rank, worker, epoch) pass, derived from the experiment seed."""
    return np.random.SeedSequence([seed % 2**63, rank, worker, epoch])


def shuffled(items: Iterator[RawSample], bufsize: int, rng: np.random.Generator) -> Iterator[RawSample]:
    """Buffer shuffle: fill ``bufsize`` items, then yield a random one per item read."""
    if bufsize <= 1:
        yield from items
        return
    buf: List[RawSample] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)  # type: ignore[arg-type]
    yield from buf


class _BatchStream(IterableDataset):
    """What both streams share: shard URLs, decoding, item construction and collation."""

    def __init__(
        self,
        urls: Sequence[str],
        spec: DecodeSpec,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not urls:
            raise DataError("no shards to read.")
        self.urls = list(urls)
        self.spec = spec
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.seed = seed
        self.num_workers = num_workers  # only for __len__; iteration uses the real worker info
        self._array_refs: Dict[str, torch.Tensor] = {}  # placeholder shapes, per worker

    # ----------------------------------------------------------------------------- items
    def _item(self, raw: RawSample, transform: ImageTransform, rng: Optional[np.random.Generator],
              shapes: Dict[str, Tuple[int, ...]]) -> Item:
        decoded = decode_sample(raw, self.spec)
        arrays = {}
        for name, array in decoded.arrays.items():
            expected = shapes.setdefault(name, tuple(array.shape))
            if tuple(array.shape) != expected:
                raise CorruptSample(f"{name}.npy has shape {tuple(array.shape)}, expected {expected}")
            arrays[name] = torch.from_numpy(np.ascontiguousarray(array))
        image = transform(decoded.image, rng) if decoded.image is not None else None
        return {"image": image, "caption": decoded.caption, "key": decoded.key, "arrays": arrays,
                "valid": True}

    def _placeholder(self, key: str = "") -> Item:
        image = torch.zeros(3, self.image_size, self.image_size) if self.spec.load_images else None
        return {"image": image, "caption": "", "key": key, "arrays": {}, "valid": False}

    def _collate(self, items: List[Item], skipped: int, worker: int) -> Dict[str, Any]:
        n = len(items)
        batch: Dict[str, Any] = {}
        if self.spec.load_images:
            batch["image"] = torch.stack([it["image"] for it in items])
        batch["caption"] = [it["caption"] for it in items]
        batch["key"] = [it["key"] for it in items]
        for name in self.spec.array_keys:
            ref = next((it["arrays"][name] for it in items if it["valid"]), self._array_refs.get(name))
            if ref is None:  # a batch of placeholders only, and no valid sample seen before
                raise DataError(f"cannot shape placeholders for '{name}': no valid sample seen yet.")
            self._array_refs[name] = ref
            batch[name] = torch.stack([it["arrays"][name] if it["valid"] else torch.zeros_like(ref)
                                       for it in items])
        batch["valid"] = torch.tensor([bool(it["valid"]) for it in items], dtype=torch.bool)
        batch["skipped"] = torch.full((n,), skipped, dtype=torch.long)
        batch["worker"] = torch.full((n,), worker, dtype=torch.long)
        return batch

    def new_pass(self) -> None:
        """Called by the DataLoader before each pass (in the main process)."""


class TrainStream(_BatchStream):
    """Endless resampled training data, handed out in passes of ``steps_per_epoch`` batches per rank.

    Each (rank, worker) reads a disjoint part of the data (see :mod:`mmdiff.data.splitting`),
    visits its shards in endless seeded random permutations, shuffles raw samples through a
    buffer, decodes, and batches. That endless per-worker stream lives as long as the worker (the
    DataLoader keeps workers alive between epochs); each epoch takes the worker's share
    (``steps_per_epoch / workers``) of the next batches, so epochs continue where the last one
    stopped instead of re-reading the beginnings of shards. Shard order, shuffling and
    augmentation are seeded from (seed, rank, worker, start epoch) — the epoch the stream starts
    at: 0 for a new run, the number of passes already made when resuming from a checkpoint.
    """

    def __init__(self, urls: Sequence[str], spec: DecodeSpec, image_size: int, batch_size: int,
                 steps_per_epoch: int, shuffle_buffer: int = 1000, random_crop: bool = False,
                 random_flip: bool = False, rank: int = 0, world: int = 1, seed: int = 0,
                 num_workers: int = 0, epoch: int = 0) -> None:
        super().__init__(urls, spec, image_size, batch_size, rank, world, seed, num_workers)
        self.steps_per_epoch = steps_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.transform = ImageTransform(image_size, random_crop, random_flip)
        self.start_epoch = epoch  # seeds the endless streams
        self.next_epoch = epoch  # passes started so far (checkpointed by the DataModule)
        self._streams: Dict[Tuple[int, int], Iterator[Dict[str, Any]]] = {}  # per process

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_streams"] = {}  # generators stay in the process that made them
        return state

    def __len__(self) -> int:
        return self.steps_per_epoch

    def new_pass(self) -> None:
        self.next_epoch += 1

    def slot(self, worker: int, num_workers: int) -> TrainSlot:
        return train_slot(len(self.urls), self.rank, self.world, worker, num_workers)

    def _raw(self, slot: TrainSlot, worker: int, rng: np.random.Generator,
             counter: SkipCounter) -> Iterator[RawSample]:
        want = None if slot.stride == 1 else slot.keeps
        while True:
            got = 0
            for shard_id in rng.permutation(np.array(slot.shard_ids)):
                url = self.urls[int(shard_id)]
                try:
                    for raw in iter_samples(url, want=want):
                        if want is None or want(raw.pos):
                            got += 1
                            yield raw
                except ShardError as err:
                    counter.skip(str(err))
            if got == 0:
                raise DataError(
                    f"training rank {self.rank} worker {worker} read "
                    f"no samples from its {len(slot.shard_ids)} shard(s) ({slot.mode} split); "
                    "check data.train_shards or use fewer data.num_workers."
                )

    def batches(self, worker: int, num_workers: int) -> Iterator[Dict[str, Any]]:
        """The endless batch stream of one (rank, worker); ``skipped`` counts since its start."""
        slot = self.slot(worker, num_workers)
        shard_rng, shuffle_rng, aug_rng = (
            np.random.default_rng(s)
            for s in seed_sequence(self.seed, self.rank, worker, self.start_epoch).spawn(3)
        )
        counter = SkipCounter(f"train rank {self.rank} worker {worker}")
        limit = max(1000, 2 * self.shuffle_buffer)
        in_a_row = 0
        shapes: Dict[str, Tuple[int, ...]] = {}
        raws = shuffled(self._raw(slot, worker, shard_rng, counter), self.shuffle_buffer, shuffle_rng)
        items: List[Item] = []
        try:
            for raw in raws:
                try:
                    items.append(self._item(raw, self.transform, aug_rng, shapes))
                    in_a_row = 0
                except Exception as err:  # CorruptSample, or anything a broken file makes PIL raise
                    counter.skip(str(err) if isinstance(err, CorruptSample) else repr(err), raw.key, raw.url)
                    in_a_row += 1
                    if in_a_row >= limit:
                        raise DataError(
                            f"training rank {self.rank} worker {worker} skipped {in_a_row} samples in a "
                            "row; the training shards look unusable (see the warnings above)."
                        ) from None
                    continue
                if len(items) == self.batch_size:
                    yield self._collate(items, counter.count, worker)
                    items = []
        finally:
            raws.close()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker, num_workers = worker_and_count()
        stream = self._streams.get((worker, num_workers))
        if stream is None:
            stream = self._streams[(worker, num_workers)] = self.batches(worker, num_workers)
        for _ in range(batches_for_worker(self.steps_per_epoch, worker, num_workers)):
            yield next(stream)


class ValStream(_BatchStream):
    """One deterministic pass over the validation shards, balanced across ranks and workers.

    ``shard_sizes`` (samples per shard, from :func:`mmdiff.data.tario.list_keys`) fixes the
    work of every (rank, worker) before anything is read; corrupt or missing samples and padding
    come out as placeholders with ``valid`` False. Centre crop, no flip.
    """

    def __init__(self, urls: Sequence[str], shard_sizes: Sequence[int], spec: DecodeSpec,
                 image_size: int, batch_size: int, rank: int = 0, world: int = 1,
                 num_workers: int = 0) -> None:
        super().__init__(urls, spec, image_size, batch_size, rank, world, 0, num_workers)
        if len(shard_sizes) != len(self.urls):
            raise ValueError("one size per validation shard is needed")
        self.shard_sizes = list(shard_sizes)
        self.transform = ImageTransform(image_size)

    @property
    def total(self) -> int:
        """Samples in the validation set (good or not)."""
        return sum(self.shard_sizes)

    def __len__(self) -> int:
        return val_batches_per_rank(self.total, self.world, self.num_workers, self.batch_size)

    def _items(self, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[Item]:
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
        items: List[Item] = []
        for item in self._items(worker, num_workers, counter):
            items.append(item)
            if len(items) == self.batch_size:
                yield self._collate(items, counter.count, worker)
                items = []
        if items:
            yield self._collate(items, counter.count, worker)
