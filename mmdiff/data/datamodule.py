"""``ShardDataModule``: webdataset shards → image/caption batches for Lightning (one CPU to many nodes).

Usage::

    dm = ShardDataModule(cfg.data, seed=cfg.seed)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    # {"image", "original_size", "crop_top_left", "caption", "key", "valid", "skipped", "worker"}

Training is resampled and endless, cut into passes of ``data.steps_per_epoch`` batches per rank
(the workers persist, so each epoch continues the previous one's streams). The rank's batch sequence
is a deterministic function of the seed, the rank, the number of workers and the shards, and can be
resumed exactly: :meth:`TrainLoader.position` says where every worker stream stands after the
first N batches, :meth:`ShardDataModule.restore_position` continues from there
(:class:`mmdiff.callbacks.data_position.DataPositionCallback` saves it in checkpoints for all ranks);
the number of passes is checkpointed through both this module's and the training loader's
``state_dict`` (without a saved position, a resumed run starts fresh streams seeded with it). Validation is
one finite, deterministic, rank-balanced pass with flagged placeholders (``batch["valid"]``) for
padding and corrupt samples (see :mod:`mmdiff.data.streams` and :mod:`mmdiff.data.splitting`). Rank and world size come from ``torch.distributed`` when it is
initialised, else from the ``RANK``/``WORLD_SIZE`` environment, else 0/1 — read when a dataloader
is built, so build dataloaders after the process group exists (Lightning does).
"""
from __future__ import annotations

import logging
import warnings
from collections import deque
from dataclasses import is_dataclass
from typing import Any, Deque, Dict, Iterator, List, Mapping, Optional, Tuple

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mmdiff.config import Crop, DataConfig
from mmdiff.config.filter_rules import parse_filters
from mmdiff.data.buckets import BucketSet
from mmdiff.data.decode import DecodeSpec
from mmdiff.data.probe import probe_rules
from mmdiff.data.shards import expand_shards, rank_and_world
from mmdiff.data.streams import POSITION_KEY
from mmdiff.data.train_stream import TrainStream
from mmdiff.data.val_stream import ValStream
from mmdiff.data.worker_signals import WorkerInit
from mmdiff.data.tario import ShardError, list_keys
from mmdiff.errors import DataError, MmdiffError

log = logging.getLogger(__name__)

# Our streams' __len__ is exact per rank whatever the number of workers (each worker makes a
# known share of the batches), so Lightning's generic caution about it is only noise.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def as_data_config(data_cfg: Any) -> DictConfig:
    """A typed ``data:`` config from a DictConfig, a :class:`DataConfig` or a plain mapping."""
    if isinstance(data_cfg, DictConfig):
        return data_cfg
    if is_dataclass(data_cfg):
        return OmegaConf.structured(data_cfg)
    if isinstance(data_cfg, Mapping):
        return OmegaConf.merge(OmegaConf.structured(DataConfig), dict(data_cfg))  # type: ignore[return-value]
    raise TypeError(f"expected a data config, got {type(data_cfg).__name__}")


class _ErrorsUnwrapped:
    """Iterator that re-raises a worker's ``MmdiffError`` as itself (one line, no worker traceback)."""

    def __init__(self, it: Iterator[Any], loader: DataLoader) -> None:
        self._it = it
        self._loader = loader

    def __iter__(self) -> "_ErrorsUnwrapped":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as err:
            # Stop the workers now: left to garbage collection, torch waits ~5 s per worker.
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
                if getattr(self._loader, "_iterator", None) is self._it:
                    self._loader._iterator = None  # a persistent loader starts fresh workers next time
            if not isinstance(err, MmdiffError):
                raise
            message = str(err)
            if message.startswith("Caught "):  # torch's ExceptionWrapper: keep the original message
                # (its traceback text reaches MmdiffError.__init__, which escapes the newlines)
                last = message.replace("\\n", "\n").strip().splitlines()[-1]
                message = last.split(": ", 1)[1] if ": " in last else last
            raise type(err)(message) from None

    def __len__(self) -> int:
        return len(self._it)  # type: ignore[arg-type]


class PassLoader(DataLoader):
    """A DataLoader that tells its stream about each new pass (``iter``), unwraps worker errors, and
    whose workers live through a job-wide SIGTERM (:mod:`mmdiff.data.worker_signals`)."""

    def __iter__(self):  # type: ignore[override]
        self.dataset.new_pass()  # type: ignore[attr-defined]
        return _ErrorsUnwrapped(super().__iter__(), self)

    def _get_iterator(self) -> Any:
        # The workers start here. The wrapper is set only for this call, so ``worker_init_fn`` stays
        # what the loader was given or what Lightning installs (its per-worker seeding, added only
        # where it finds None), and that function still runs in each worker, after the wrapper's.
        if self.num_workers == 0:
            return super()._get_iterator()
        chained = self.worker_init_fn
        self.worker_init_fn = WorkerInit(chained)
        try:
            return super()._get_iterator()
        finally:
            self.worker_init_fn = chained


class _InOrder:
    """Hands out a training pass in the canonical order (batch ``j`` from worker ``j % workers``).

    The DataLoader always starts a pass with worker 0; after an exact resume the first pass starts
    at batch ``r`` of an interrupted pass, whose worker is ``r % workers``, so batches are held
    back (at most one per worker) until it is their turn. The stream position each batch carries
    is removed here and recorded by the loader.
    """

    def __init__(self, it: Iterator[Any], loader: "TrainLoader", start: int, count: int) -> None:
        self._it = it
        self._loader = loader
        self._next = start  # canonical in-pass index of the next batch to hand out
        self._end = start + count
        self._held: Dict[int, List[Any]] = {}

    def __iter__(self) -> "_InOrder":
        return self

    def __next__(self) -> Any:
        if self._next >= self._end:
            raise StopIteration
        workers = max(1, self._loader.num_workers)
        want = self._next % workers
        while not self._held.get(want):
            batch = next(self._it)
            worker = int(batch["worker"][0]) if "worker" in batch else 0
            self._held.setdefault(worker, []).append(batch)
        batch = self._held[want].pop(0)
        self._next += 1
        self._loader._handed_out(want, batch.pop(POSITION_KEY, None))
        return batch

    def __len__(self) -> int:
        return self._end - self._next


class TrainLoader(PassLoader):
    """The training loader: passes in a fixed order, and resumable exactly (see :meth:`position`).

    ``state_dict`` (saved by Lightning with the fit loop) is the number of passes started; the
    exact position — what every worker stream has made after the rank's first N batches — comes
    from :meth:`position` and is checkpointed for all ranks by
    :class:`mmdiff.callbacks.data_position.DataPositionCallback`, which hands it back through
    :meth:`ShardDataModule.restore_position` before the loader is built.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stream: TrainStream = self.dataset  # type: ignore[assignment]
        self.consumed = stream.resumed_batches  # batches of this rank handed out, over all runs
        # Per worker, the positions after its last two batches: (rank batch index, position).
        self._recent: Dict[int, Deque[Tuple[int, Any]]] = {}
        if stream.resume:
            for w, pos in enumerate(stream.resume["slots"]):
                if pos is not None:
                    self._recent[w] = deque([(-1, pos)], maxlen=2)
        self._first_pass = True

    def __iter__(self):  # type: ignore[override]
        stream: TrainStream = self.dataset  # type: ignore[assignment]
        stream.new_pass()
        spe = stream.steps_per_epoch
        start = stream.resumed_batches % spe if self._first_pass else 0
        self._first_pass = False
        inner = _ErrorsUnwrapped(DataLoader.__iter__(self), self)
        return _InOrder(inner, self, start, spe - start)

    def _handed_out(self, worker: int, position: Any) -> None:
        if position is not None:
            self._recent.setdefault(worker, deque(maxlen=2)).append((self.consumed, position))
        self.consumed += 1

    def position(self, consumed: Optional[int] = None) -> Dict[str, Any]:
        """Where this rank's training data stands after its first ``consumed`` batches.

        ``consumed`` defaults to the batches handed out so far; it may be one less (a checkpoint
        written while the last batch was still being trained on, which Lightning re-runs).
        The result — plain ints/lists/tensors — is what ``TrainStream(resume=...)`` takes.
        """
        stream: TrainStream = self.dataset  # type: ignore[assignment]
        if consumed is None or not self.consumed - 1 <= consumed <= self.consumed:
            if consumed is not None:
                log.warning("data position asked for batch %d but %d were handed out; saving the latter",
                            consumed, self.consumed)
            consumed = self.consumed
        workers = max(1, self.num_workers)
        slots: List[Any] = []
        for w in range(workers):
            chosen = None
            for index, pos in self._recent.get(w, ()):
                if index < consumed:
                    chosen = pos
            slots.append(chosen)
        generation = stream.resume.get("generation", stream.start_epoch) if stream.resume else stream.start_epoch
        return {
            "version": 1, "consumed": int(consumed), "rank": stream.rank, "world": stream.world,
            "num_workers": workers, "steps_per_epoch": stream.steps_per_epoch,
            "batch_size": stream.batch_size, "shuffle_buffer": stream.shuffle_buffer,
            "seed": stream.seed, "num_shards": len(stream.urls), "generation": int(generation),
            "buckets": stream.buckets.describe() if stream.buckets else None, "slots": slots,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {"next_train_epoch": int(self.dataset.next_epoch)}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        epoch = int(state_dict.get("next_train_epoch", 0))
        stream: TrainStream = self.dataset  # type: ignore[assignment]
        stream.next_epoch = epoch
        if not stream.resume:  # no exact position: fresh streams seeded with the pass count
            stream.start_epoch = epoch


def position_mismatch(position: Mapping[str, Any], stream: TrainStream) -> Optional[str]:
    """Why a saved data position does not fit ``stream`` (None when it does)."""
    expected = {
        "rank": stream.rank, "world": stream.world, "num_workers": max(1, stream.num_workers),
        "steps_per_epoch": stream.steps_per_epoch, "batch_size": stream.batch_size,
        "shuffle_buffer": stream.shuffle_buffer, "seed": stream.seed, "num_shards": len(stream.urls),
    }
    for key, value in expected.items():
        if int(position.get(key, -1)) != int(value):
            return f"{key} was {position.get(key)} and is now {value}"
    buckets = stream.buckets.describe() if stream.buckets else None
    if position.get("buckets") != buckets:
        return f"the buckets were {position.get('buckets')} and are now {buckets}"
    return None


class ShardDataModule(L.LightningDataModule):
    """LightningDataModule over webdataset shards (``data:`` section of the experiment config)."""

    def __init__(self, data_cfg: Any, seed: int = 0) -> None:
        super().__init__()
        self.cfg = as_data_config(data_cfg)
        self.seed = int(seed)
        self.train_urls: Optional[List[str]] = None
        self.val_urls: Optional[List[str]] = None
        self.val_sizes: Optional[List[int]] = None
        self._next_epoch = 0
        self._train_stream: Optional[TrainStream] = None
        self._resume_position: Optional[Dict[str, Any]] = None
        self.buckets = BucketSet.from_config(self.cfg)

    # ------------------------------------------------------------------------------ setup
    def decode_spec(self) -> DecodeSpec:
        c = self.cfg
        return DecodeSpec(
            caption_key=c.caption_key,
            load_images=bool(c.load_images),
            array_keys=tuple(c.array_keys),
            max_image_pixels=int(c.max_image_pixels),
            draft_size=self.buckets.max_side if self.buckets else int(c.image_size),
            filters=tuple(parse_filters(list(c.filters))),
            min_size=int(c.min_size),
        )

    def setup(self, stage: Optional[str] = None) -> None:
        """Expand shard specs (checking local files exist) and index the validation shards."""
        if stage in (None, "fit"):
            self._setup_train()
        if stage in (None, "fit", "validate"):
            self._setup_val()

    def _setup_train(self) -> None:
        if self.train_urls is not None:
            return
        self.train_urls = expand_shards(list(self.cfg.train_shards), "data.train_shards")
        if not self.train_urls:
            raise DataError(
                "data.train_shards is empty; list the training shards, e.g. data/train-{000000..000009}.tar."
            )
        log.info("training on %d shard(s)", len(self.train_urls))
        probe_rules(self.train_urls, self.decode_spec())

    def _setup_val(self) -> None:
        if self.val_urls is not None or len(self.cfg.val_shards) == 0:
            return
        urls = expand_shards(list(self.cfg.val_shards), "data.val_shards")
        self.val_sizes = self._index(urls)
        self.val_urls = urls
        log.info("validating on %d samples in %d shard(s)", sum(self.val_sizes), len(urls))

    @staticmethod
    def _index(urls: List[str]) -> List[int]:
        sizes = []
        for url in urls:
            try:
                sizes.append(len(list_keys(url)))
            except ShardError as err:
                raise DataError(f"data.val_shards: {err}; fix or remove that shard.") from None
        if sum(sizes) == 0:
            raise DataError("data.val_shards hold no samples; check the validation shards.")
        return sizes

    # ------------------------------------------------------------------------ dataloaders
    def _loader(self, dataset: Any, persistent: bool) -> DataLoader:
        workers = int(self.cfg.num_workers)
        return (TrainLoader if isinstance(dataset, TrainStream) else PassLoader)(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Endless resampled training batches, ``data.steps_per_epoch`` of them per pass and rank."""
        self._setup_train()
        assert self.train_urls is not None
        rank, world = rank_and_world()
        c = self.cfg
        epoch = self.next_train_epoch
        self._train_stream = TrainStream(
            self.train_urls,
            self.decode_spec(),
            image_size=int(c.image_size),
            batch_size=int(c.batch_size),
            steps_per_epoch=int(c.steps_per_epoch),
            shuffle_buffer=int(c.shuffle_buffer),
            random_crop=c.crop == Crop.random,
            random_flip=bool(c.random_flip),
            random_shift=int(c.random_shift),
            rank=rank,
            world=world,
            seed=self.seed,
            num_workers=int(c.num_workers),
            epoch=epoch,
            buckets=self.buckets,
        )
        position, self._resume_position = self._resume_position, None  # used by one loader only
        if position is not None:
            problem = position_mismatch(position, self._train_stream)
            if problem:
                log.warning("rank %d: cannot resume the training data exactly (%s); starting fresh "
                            "streams instead", rank, problem)
            else:
                self._train_stream.resume = position
                log.info("rank %d: training data resumes exactly after batch %d", rank,
                         int(position["consumed"]))
        slot = self._train_stream.slot(0, int(c.num_workers))
        log.info("rank %d/%d: training shards split by %s", rank, world, slot.mode)
        if slot.mode == "samples" and world > 1:
            log.warning("fewer training shards (%d) than ranks (%d): every rank reads every shard; "
                        "write more shards for speed.", len(self.train_urls), world)
        # Persistent workers keep each worker's endless stream going from one epoch to the next.
        return self._loader(self._train_stream, persistent=True)

    def val_dataloader(self) -> Any:
        """One balanced validation pass (``[]`` when no ``data.val_shards`` are configured)."""
        self._setup_val()
        if not self.val_urls:
            return []
        assert self.val_sizes is not None
        rank, world = rank_and_world()
        c = self.cfg
        stream = ValStream(
            self.val_urls,
            self.val_sizes,
            self.decode_spec(),
            image_size=int(c.image_size),
            batch_size=int(c.val_batch_size),
            rank=rank,
            world=world,
            num_workers=int(c.num_workers),
            buckets=self.buckets,
        )
        return self._loader(stream, persistent=False)

    # --------------------------------------------------------------------- checkpointing
    @property
    def next_train_epoch(self) -> int:
        """Training passes (epochs) started so far: a new training stream is seeded with it."""
        return self._train_stream.next_epoch if self._train_stream is not None else self._next_epoch

    def restore_position(self, position: Optional[Mapping[str, Any]]) -> None:
        """Resume the next training loader exactly at ``position`` (from :meth:`TrainLoader.position`
        on this rank): its worker streams continue where they stood, its first pass is the rest of
        the interrupted one. A position that no longer fits (other world size, workers, batch size,
        shards, seed) is ignored with a warning. ``None`` clears it.
        """
        self._resume_position = dict(position) if position is not None else None

    def state_dict(self) -> Dict[str, Any]:
        return {"next_train_epoch": int(self.next_train_epoch)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._next_epoch = int(state_dict.get("next_train_epoch", 0))
        if self._train_stream is not None:  # not iterated yet when Lightning restores state
            self._train_stream.next_epoch = self._train_stream.start_epoch = self._next_epoch
