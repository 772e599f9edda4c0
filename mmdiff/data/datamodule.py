"""``ShardDataModule``: webdataset shards → image/caption batches for Lightning (one CPU to many nodes).

Usage::

    dm = ShardDataModule(cfg.data, seed=cfg.seed)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))   # {"image", "caption", "key", "valid", "skipped", "worker"}

Training is resampled and endless, cut into passes of ``data.steps_per_epoch`` batches per rank
(the workers persist, so each epoch continues the previous one's streams; the number of passes is
checkpointed through both this module's and the training loader's ``state_dict``); validation is
one finite, deterministic, rank-balanced pass with flagged placeholders (``batch["valid"]``) for
padding and corrupt samples (see :mod:`mmdiff.data.streams` and :mod:`mmdiff.data.splitting`). Rank and world size come from ``torch.distributed`` when it is
initialised, else from the ``RANK``/``WORLD_SIZE`` environment, else 0/1 — read when a dataloader
is built, so build dataloaders after the process group exists (Lightning does).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import is_dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mmdiff.config import Crop, DataConfig
from mmdiff.data.decode import DecodeSpec
from mmdiff.data.shards import expand_shards, rank_and_world
from mmdiff.data.streams import TrainStream, ValStream
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
                last = message.strip().splitlines()[-1]
                message = last.split(": ", 1)[1] if ": " in last else last
            raise type(err)(message) from None

    def __len__(self) -> int:
        return len(self._it)  # type: ignore[arg-type]


class PassLoader(DataLoader):
    """A DataLoader that tells its stream about each new pass (``iter``), and unwraps worker errors."""

    def __iter__(self):  # type: ignore[override]
        self.dataset.new_pass()  # type: ignore[attr-defined]
        return _ErrorsUnwrapped(super().__iter__(), self)


class TrainLoader(PassLoader):
    """The training loader; stateful for Lightning, so a mid-epoch checkpoint resumes cleanly.

    Its state is the number of passes started: a resumed run starts fresh endless streams seeded
    with it (statistically a continuation; batches are not replayed or skipped one by one).
    """

    def state_dict(self) -> Dict[str, Any]:
        return {"next_train_epoch": int(self.dataset.next_epoch)}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        epoch = int(state_dict.get("next_train_epoch", 0))
        self.dataset.next_epoch = self.dataset.start_epoch = epoch  # type: ignore[attr-defined]


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

    # ------------------------------------------------------------------------------ setup
    def decode_spec(self) -> DecodeSpec:
        c = self.cfg
        return DecodeSpec(
            caption_key=c.caption_key,
            load_images=bool(c.load_images),
            array_keys=tuple(c.array_keys),
            max_image_pixels=int(c.max_image_pixels),
            draft_size=int(c.image_size),
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
            rank=rank,
            world=world,
            seed=self.seed,
            num_workers=int(c.num_workers),
            epoch=epoch,
        )
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
        )
        return self._loader(stream, persistent=False)

    # --------------------------------------------------------------------- checkpointing
    @property
    def next_train_epoch(self) -> int:
        """Training passes (epochs) started so far: a new training stream is seeded with it."""
        return self._train_stream.next_epoch if self._train_stream is not None else self._next_epoch

    def state_dict(self) -> Dict[str, Any]:
        return {"next_train_epoch": int(self.next_train_epoch)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._next_epoch = int(state_dict.get("next_train_epoch", 0))
        if self._train_stream is not None:  # not iterated yet when Lightning restores state
            self._train_stream.next_epoch = self._train_stream.start_epoch = self._next_epoch
