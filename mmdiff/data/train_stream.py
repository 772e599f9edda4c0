"""The training stream: endless, resampled, seeded, exactly resumable (see :class:`TrainStream`)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mmdiff.data.buckets import BucketSet, ShapeBuffers
from mmdiff.data.decode import CorruptSample, DecodeSpec
from mmdiff.data.filters import DropCounter, Dropped
from mmdiff.data.seeding import mix
from mmdiff.data.shards import worker_and_count
from mmdiff.data.skips import SkipCounter
from mmdiff.data.splitting import TrainSlot, batches_for_worker, train_slot
from mmdiff.data.streams import POSITION_KEY, BatchStream, Item
from mmdiff.data.tario import RawSample, ShardError, iter_samples
from mmdiff.data.transforms import ImageTransform
from mmdiff.errors import DataError

log = logging.getLogger(__name__)

#: A worker stops (with one line) after this many dropped samples in a row: rules that drop
#: everything in its shards would otherwise read for ever.
_DROPS_IN_A_ROW = 100_000


class _SlotStream:
    """The endless batch stream of one (rank, worker) slot, with a position that can be saved.

    Everything random is a function of (seed, rank, worker, generation) and a counter, so the
    stream is a deterministic function of those and the shards, and its state at a batch boundary
    is a handful of integers plus the identities (shard, position) of the samples in the shuffle
    buffer (:meth:`position`). :meth:`restore` rebuilds that state by re-reading only the buffered
    samples and the already-read head of the current shard: cheap, whatever the run's length.

    * shard order: round ``n`` visits the slot's shards in ``permutation(n)``;
    * shuffle buffer: the ``i``-th sample read replaces buffer entry ``mix(..., i) % size``;
    * augmentation: the ``k``-th sample out of the buffer is cropped/flipped/shifted with its own rng,
      and its caption drawn (when it has several) with another;
    * buckets: raw samples wait in one buffer per shape (the bucket, from the image header:
      :class:`ShapeBuffers`) and are decoded when their buffer fills, so the batches are a pure
      function of the sample order; the position lists the waiting samples as (shard, position,
      k), and :meth:`restore` re-reads them (at most buckets × (batch size - 1) samples).
    """

    def __init__(self, ds: "TrainStream", worker: int, num_workers: int,
                 position: Optional[Dict[str, Any]] = None) -> None:
        self.ds = ds
        self.worker = worker
        self.slot = ds.slot(worker, num_workers)
        self.generation = int(position["generation"]) if position else int(ds.start_epoch)
        self.seeds = (ds.seed % 2**63, ds.rank, worker, self.generation)
        self.counter = SkipCounter(f"train rank {ds.rank} worker {worker}")
        self.drops = DropCounter(ds.drop_names)
        # Consecutive dropped samples: a safety net only (never shapes the data), so not in position().
        self.dropped_in_a_row = 0
        self.shard_index = {url: i for i, url in enumerate(ds.urls)}
        self.round = 0  # passes over the slot's shards begun
        self.idx = 0  # index into this round's shard permutation
        self.next_pos = 0  # first sample position of the current shard not read yet
        self.got = 0  # samples read in this round
        self.n_in = 0  # samples read from the shards (into the shuffle buffer)
        self.n_out = 0  # samples handed out of the shuffle buffer
        self.in_a_row = 0  # consecutive skipped samples
        self.batches = 0  # batches made
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.buf: List[RawSample] = []
        # Raw samples waiting for a full batch of their shape: (raw, (shard, pos, k), shape).
        self.waiting: ShapeBuffers[Tuple[RawSample, Tuple[int, int, int], Any]] = ShapeBuffers(ds.batch_size)
        self._it: Optional[Iterator[RawSample]] = None
        self.perm = self._perm(0)
        if position:
            self._restore(position)

    # ------------------------------------------------------------------------- randomness
    def _perm(self, round_: int) -> List[int]:
        rng = np.random.default_rng([*self.seeds, 0, round_])
        return [int(i) for i in rng.permutation(np.array(self.slot.shard_ids))]

    def _aug_rng(self, k: int) -> Optional[np.random.Generator]:
        if not self.ds.transform.is_random:
            return None
        return np.random.default_rng([*self.seeds, 2, k])

    # ---------------------------------------------------------------------------- reading
    def _close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None

    def _next_raw(self) -> RawSample:
        """The next sample of the slot's shards (endless: round after round)."""
        keeps = self.slot.keeps
        while True:
            if self.idx >= len(self.perm):
                if self.got == 0:
                    raise DataError(
                        f"training rank {self.ds.rank} worker {self.worker} read no samples from its "
                        f"{len(self.slot.shard_ids)} shard(s) ({self.slot.mode} split); check "
                        "data.train_shards or use fewer data.num_workers."
                    )
                self.round += 1
                self.perm = self._perm(self.round)
                self.idx = self.got = self.next_pos = 0
            if self._it is None:
                start = self.next_pos
                want = None if (start == 0 and self.slot.stride == 1) else (
                    lambda p, s=start: p >= s and keeps(p))
                self._it = iter_samples(self.ds.urls[self.perm[self.idx]], want=want)
            try:
                raw = next(self._it)
            except StopIteration:
                raw = None
            except ShardError as err:
                self.counter.skip(str(err))
                raw = None
            if raw is None:  # the shard is done (or broken): on to the next one
                self._close()
                self.idx += 1
                self.next_pos = 0
                continue
            if raw.pos < self.next_pos or not keeps(raw.pos):
                continue
            self.next_pos = raw.pos + 1
            self.got += 1
            return raw

    def _next_sample(self) -> RawSample:
        """The next sample out of the shuffle buffer."""
        size = self.ds.shuffle_buffer
        if size <= 1:
            self.n_in += 1
            self.n_out += 1
            return self._next_raw()
        while len(self.buf) < size:
            self.buf.append(self._next_raw())
            self.n_in += 1
        item = self._next_raw()
        i = mix(*self.seeds, 1, self.n_in) % len(self.buf)
        self.n_in += 1
        self.buf[i], item = item, self.buf[i]
        self.n_out += 1
        return item

    def _skipped(self, err: Exception, raw: RawSample) -> None:
        """Count a sample that does not decode; too many in a row means the shards are unusable."""
        self.counter.skip(str(err) if isinstance(err, CorruptSample) else repr(err), raw.key, raw.url)
        self.in_a_row += 1
        if self.in_a_row >= max(1000, 2 * self.ds.shuffle_buffer):
            raise DataError(
                f"training rank {self.ds.rank} worker {self.worker} skipped {self.in_a_row} samples "
                "in a row; the training shards look unusable (see the warnings above)."
            ) from None

    def _dropped(self, err: Dropped) -> None:
        """Count a sample the data rules leave out; strict filters may keep 1 %, so far more of
        them in a row are tolerated than corrupt samples."""
        self.drops.drop(err)
        self.dropped_in_a_row += 1
        if self.dropped_in_a_row >= _DROPS_IN_A_ROW:
            raise DataError(
                f"training rank {self.ds.rank} worker {self.worker} dropped {self.dropped_in_a_row} samples "
                "in a row; loosen data.filters / data.min_size or check the shards."
            ) from None

    def _decode(self, raw: RawSample, k: int) -> Optional[Item]:
        """The ``k``-th sample out of the shuffle buffer, decoded and augmented; None (counted) if it
        does not decode."""
        try:
            item = self.ds._item(raw, self.ds.transform, self._aug_rng(k), self.shapes, (*self.seeds, 3, k))
        except Dropped as err:
            self._dropped(err)
            return None
        except Exception as err:  # CorruptSample, or anything a broken file makes PIL raise
            self._skipped(err, raw)
            return None
        self.in_a_row = self.dropped_in_a_row = 0
        return item

    def _bucketed_items(self) -> List[Item]:
        """The next batch of one shape: raw samples wait per shape (read from the header) and are
        decoded when their buffer fills; one that fails then is counted and the rest wait on."""
        ds = self.ds
        while True:
            raw = self._next_sample()
            k = self.n_out - 1
            try:
                key = ds._bucket_key(raw, ds.transform, self._aug_rng(k), self.shapes)
            except Dropped as err:
                self._dropped(err)
                continue
            except Exception as err:
                self._skipped(err, raw)
                continue
            full = self.waiting.add(key, (raw, (self.shard_index[raw.url], raw.pos, k), key))
            if full is None:
                continue
            decoded = [(self._decode(r, ident[2]), (r, ident, key)) for r, ident, key in full]
            if all(item is not None for item, _ in decoded):
                return [item for item, _ in decoded]  # type: ignore[misc]
            for item, entry in decoded:
                if item is not None:
                    self.waiting.add(key, entry)

    def next_batch(self) -> Dict[str, Any]:
        ds = self.ds
        items: List[Item] = []
        if ds.buckets is None:
            while len(items) < ds.batch_size:
                raw = self._next_sample()
                item = self._decode(raw, self.n_out - 1)
                if item is not None:
                    items.append(item)
        else:
            items = self._bucketed_items()
        self.batches += 1
        batch = ds._collate(items, self.counter.count, self.worker, self.drops)
        batch[POSITION_KEY] = self.position()
        return batch

    # --------------------------------------------------------------------------- position
    def position(self) -> Dict[str, Any]:
        """The stream's state after its last batch: plain ints, lists and int64 tensors."""
        buffer = torch.tensor([[self.shard_index[r.url], r.pos] for r in self.buf], dtype=torch.long)
        position = {
            "generation": self.generation, "round": self.round, "idx": self.idx,
            "next_pos": self.next_pos, "got": self.got, "n_in": self.n_in, "n_out": self.n_out,
            "in_a_row": self.in_a_row, "batches": self.batches,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "buffer": buffer.reshape(-1, 2),
        }
        if self.ds.buckets is not None:  # the samples waiting in their shape's buffer, in arrival order
            waiting = sorted((ident for _, ident, _ in self.waiting.pending()), key=lambda ident: ident[2])
            position["waiting"] = torch.tensor(waiting, dtype=torch.long).reshape(-1, 3)
        return position

    def _restore(self, p: Dict[str, Any]) -> None:
        for name in ("round", "idx", "next_pos", "got", "n_in", "n_out", "in_a_row", "batches"):
            setattr(self, name, int(p[name]))
        self.shapes = {k: tuple(int(x) for x in v) for k, v in p.get("shapes", {}).items()}
        self.perm = self._perm(self.round)
        wanted = [(int(s), int(q)) for s, q in torch.as_tensor(p["buffer"]).reshape(-1, 2).tolist()]
        rows = torch.as_tensor(p.get("waiting", torch.zeros(0, 3, dtype=torch.long))).reshape(-1, 3)
        waiting = [(int(sid), int(pos), int(k)) for sid, pos, k in rows.tolist()]
        found = self._reread(wanted + [(sid, pos) for sid, pos, _ in waiting])
        self.buf = [found[w] for w in wanted if w in found]
        for sid, pos, k in waiting:  # in the order they arrived: the same buffers
            raw = found.get((sid, pos))
            try:
                key = self.ds._bucket_key(raw, self.ds.transform, self._aug_rng(k), self.shapes) if raw else None
            except Exception:  # it was read before: the shard changed (warned about below)
                key = None
            if key is not None:
                self.waiting.add(key, (raw, (sid, pos, k), key))
        lost = len(wanted) + len(waiting) - len(self.buf) - len(self.waiting)
        if lost:
            log.warning("train rank %d worker %d: %d of %d buffered samples are gone (the training "
                        "shards changed since the checkpoint?); the data order is no longer exact",
                        self.ds.rank, self.worker, lost, len(wanted) + len(waiting))

    def _reread(self, wanted: List[Tuple[int, int]]) -> Dict[Tuple[int, int], RawSample]:
        """The raw samples at these (shard, position)s, read again (missing ones left out)."""
        found: Dict[Tuple[int, int], RawSample] = {}
        by_shard: Dict[int, set] = {}
        for sid, pos in wanted:
            by_shard.setdefault(sid, set()).add(pos)
        for sid, positions in by_shard.items():
            try:
                for raw in iter_samples(self.ds.urls[sid], want=positions.__contains__, stop=max(positions) + 1):
                    if raw.pos in positions:
                        found[(sid, raw.pos)] = raw
            except (ShardError, IndexError) as err:
                log.warning("train rank %d worker %d: cannot re-read buffered samples: %s",
                            self.ds.rank, self.worker, err)
        return found


class TrainStream(BatchStream):
    """Endless resampled training data, handed out in passes of ``steps_per_epoch`` batches per rank.

    Each (rank, worker) reads a disjoint part of the data (see :mod:`mmdiff.data.splitting`),
    visits its shards in endless seeded random permutations, shuffles raw samples through a
    buffer, decodes, and batches (:class:`_SlotStream`). That endless per-worker stream lives as
    long as the worker (the DataLoader keeps workers alive between epochs); each pass takes the
    worker's share (``steps_per_epoch / workers``) of the next batches, and the DataLoader
    interleaves the workers round-robin, so the rank's batch ``j`` of a pass comes from worker
    ``j % workers``.

    The rank's batch sequence is thus a deterministic function of (seed, rank, workers,
    generation) and the shards, and the stream can be resumed *exactly*: every batch carries its
    worker stream's position (``batch[POSITION_KEY]``), and ``resume`` — the position of every
    worker after the rank's first ``consumed`` batches (see
    :meth:`~mmdiff.data.datamodule.TrainLoader.position`) — restarts each worker stream there and
    makes the first pass the remainder of the interrupted one. Without ``resume``, streams start
    at their beginning in generation ``epoch`` (0 for a new run; the number of passes already made
    when resuming from an older checkpoint that saved no positions).
    """

    def __init__(self, urls: Sequence[str], spec: DecodeSpec, image_size: int, batch_size: int,
                 steps_per_epoch: int, shuffle_buffer: int = 1000, random_crop: bool = False,
                 random_flip: bool = False, rank: int = 0, world: int = 1, seed: int = 0,
                 num_workers: int = 0, epoch: int = 0, resume: Optional[Dict[str, Any]] = None,
                 buckets: Optional[BucketSet] = None, random_shift: int = 0) -> None:
        super().__init__(urls, spec, image_size, batch_size, rank, world, seed, num_workers, buckets)
        self.steps_per_epoch = steps_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.transform = ImageTransform(image_size, random_crop, random_flip, random_shift)
        self.start_epoch = epoch  # the generation new streams are seeded with
        self.next_epoch = epoch  # passes started so far (checkpointed by the DataModule)
        self.resume = resume  # per-worker positions after `resume["consumed"]` batches, or None
        self._streams: Dict[Tuple[int, int], _SlotStream] = {}  # per process
        self._passes: Dict[Tuple[int, int], int] = {}  # passes begun, per process

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_streams"] = {}  # open shard readers stay in the process that made them
        return state

    def __len__(self) -> int:
        return self.steps_per_epoch

    def new_pass(self) -> None:
        self.next_epoch += 1

    @property
    def resumed_batches(self) -> int:
        """Batches of this rank consumed before the stream was (exactly) resumed; 0 otherwise."""
        return int(self.resume["consumed"]) if self.resume else 0

    def slot(self, worker: int, num_workers: int) -> TrainSlot:
        return train_slot(len(self.urls), self.rank, self.world, worker, num_workers)

    def pass_share(self, worker: int, num_workers: int, first: bool) -> int:
        """Batches ``worker`` makes in a pass; the first pass after a resume is the remainder."""
        share = batches_for_worker(self.steps_per_epoch, worker, num_workers)
        if first and self.resume:
            done = self.resumed_batches % self.steps_per_epoch
            share -= batches_for_worker(done, worker, num_workers)
        return share

    def slot_stream(self, worker: int, num_workers: int) -> _SlotStream:
        """This process's stream of ``worker`` (made on first use, at the resume position if any)."""
        key = (worker, num_workers)
        stream = self._streams.get(key)
        if stream is None:
            position = None
            if self.resume:
                slots = self.resume["slots"]
                position = slots[worker] if worker < len(slots) else None
                if position is None:  # that worker had made no batch yet: start it afresh
                    position = {"generation": self.resume.get("generation", self.start_epoch),
                                **_FRESH}
            stream = self._streams[key] = _SlotStream(self, worker, num_workers, position)
        return stream

    def batches(self, worker: int, num_workers: int) -> Iterator[Dict[str, Any]]:
        """The endless batch stream of one (rank, worker); ``skipped`` counts since its start."""
        stream = _SlotStream(self, worker, num_workers)
        while True:
            yield stream.next_batch()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker, num_workers = worker_and_count()
        key = (worker, num_workers)
        stream = self.slot_stream(worker, num_workers)
        passes = self._passes.get(key, 0)
        self._passes[key] = passes + 1
        for _ in range(self.pass_share(worker, num_workers, first=passes == 0)):
            yield stream.next_batch()


_FRESH: Dict[str, Any] = {"round": 0, "idx": 0, "next_pos": 0, "got": 0, "n_in": 0, "n_out": 0,
                          "in_a_row": 0, "batches": 0, "shapes": {}, "buffer": torch.zeros(0, 2, dtype=torch.long)}
