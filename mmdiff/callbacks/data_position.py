"""Exact resume: save every rank's training-data position in the checkpoint, and restore it.

``DataPositionCallback`` asks the training loader (:class:`mmdiff.data.datamodule.TrainLoader`)
where its worker streams stand after the batches Lightning has trained on, gathers that from all
ranks (a checkpoint is written by rank 0 only) and stores it as ``checkpoint["callbacks"]
["DataPosition"] = {"ranks": [position of rank 0, rank 1, ...]}``. On resume it hands each rank
its own position through :meth:`ShardDataModule.restore_position` before Lightning builds the
training loader, so the resumed run sees exactly the batches an uninterrupted run would.

Together with :class:`StepSeedCallback` (torch's global RNG reseeded per batch from the seed, the
rank and the batch index, so the diffusion noise does not depend on what ran before) a resumed
run repeats the uninterrupted one's losses. Loaders without ``position`` (other DataModules) are
left alone.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def batches_trained(trainer: L.Trainer) -> int:
    """Training batches (not optimiser steps) this run has completely processed, over all resumes."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)


class DataPositionCallback(Callback):
    """Checkpoints the training data position of every rank; restores this rank's on resume."""

    def __init__(self) -> None:
        self._trainer: Optional[L.Trainer] = None
        self._pending: Optional[List[Any]] = None

    @property
    def state_key(self) -> str:
        return "DataPosition"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # setup runs before Lightning restores callback states

    def state_dict(self) -> Dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {}
        loader = trainer.fit_loop._combined_loader.iterables if trainer.fit_loop._combined_loader else None
        position = loader.position(batches_trained(trainer)) if hasattr(loader, "position") else None
        ranks: List[Any] = [position]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, position)  # rank 0 writes the file: it needs everyone's
        if all(p is None for p in ranks):
            return {}
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        ranks = state_dict.get("ranks")
        trainer = self._trainer
        if not ranks or trainer is None:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if not hasattr(datamodule, "restore_position"):
            return
        if len(ranks) != trainer.world_size:
            log.warning("the checkpoint holds the data positions of %d rank(s) but this run has %d; "
                        "the training data starts fresh streams instead", len(ranks), trainer.world_size)
            return
        datamodule.restore_position(ranks[trainer.global_rank])


class StepSeedCallback(Callback):
    """Reseed torch's global RNG before every training batch from (seed, rank, batch index).

    Caption dropout, the VAE posterior sample, timesteps and noise then depend only on the batch's
    index, not on what consumed random numbers before it (validation, previews, a DataLoader
    starting, a restart): an interrupted-and-resumed run draws exactly what an uninterrupted run
    draws. Ranks get different streams. Lightning itself does not checkpoint RNG states.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        index = int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)  # 1-based, over resumes
        torch.manual_seed(step_seed(self.seed, trainer.global_rank, index))


def step_seed(seed: int, rank: int, index: int) -> int:
    """The torch seed of training batch ``index`` (1-based) on ``rank``."""
    state = np.random.SeedSequence([seed % 2**63, rank, index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])
