"""``DataStatsCallback``: how many corrupt samples the data pipeline skipped, logged as metrics.

Batches from :mod:`mmdiff.data` carry ``skipped`` (the cumulative skip count of the DataLoader
worker that made the batch: since its training stream started — once per fit, the workers
persist across epochs — or within the validation pass) and ``worker``. This callback keeps the
largest value per (split, worker), sums over workers, and logs

* ``data/skipped_train`` — total since the start of training (all epochs, and earlier runs when
  resumed from a checkpoint), every step;
* ``data/skipped_val``   — total of the last validation pass, at the end of the pass;

both summed over ranks (``sync_dist=True, reduce_fx="sum"``), so the logged value is the
whole job's count.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def _fold(per_worker: Dict[int, int], batch: Any) -> bool:
    if not isinstance(batch, Mapping):
        return False
    skipped, worker = batch.get("skipped"), batch.get("worker")
    if skipped is None or worker is None or len(skipped) == 0:
        return False
    wid = int(worker[0])
    per_worker[wid] = max(per_worker.get(wid, 0), int(skipped.max()))
    return True


class DataStatsCallback(Callback):
    """Logs ``data/skipped_train`` and ``data/skipped_val`` (sums over workers and ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_done = 0  # skips of earlier runs, restored from the checkpoint (this rank)
        self.train_pass: Dict[int, int] = {}  # per worker: its stream's count since it started
        self.val_pass: Dict[int, int] = {}

    @property
    def skipped_train(self) -> int:
        """This rank's training skips so far."""
        return self.train_done + sum(self.train_pass.values())

    @property
    def skipped_val(self) -> int:
        """This rank's skips in the current (or last) validation pass."""
        return sum(self.val_pass.values())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not _fold(self.train_pass, batch):
            return
        # Logged (and all-reduced: one scalar) every batch on every rank, so the collective always
        # matches up; Lightning writes it to the logger every `log_every_n_steps`.
        value = torch.tensor(float(self.skipped_train), device=pl_module.device)
        pl_module.log("data/skipped_train", value, on_step=True, on_epoch=False,
                      reduce_fx="sum", sync_dist=True, batch_size=1)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_pass = {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _fold(self.val_pass, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = torch.tensor(float(self.skipped_val), device=pl_module.device)
        pl_module.log("data/skipped_val", value, on_step=False, on_epoch=True,
                      reduce_fx="sum", sync_dist=True, batch_size=1)

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped_train": int(self.skipped_train)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.train_done = int(state_dict.get("skipped_train", 0))
        self.train_pass = {}
