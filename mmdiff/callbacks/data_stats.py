"""``DataStatsCallback``: how many corrupt samples the data pipeline skipped, logged as metrics.

Batches from :mod:`mmdiff.data` carry ``skipped`` (the cumulative skip count of the DataLoader
worker that made the batch: since its training stream started — once per fit, the workers
persist across epochs — or within the validation pass) and ``worker``. This callback keeps the
largest value per (split, worker), sums over workers, and logs

* ``data/skipped_train`` — total since the start of training (all epochs, and earlier runs when
  resumed from a checkpoint), every step;
* ``data/skipped_val``   — total of the last validation pass, at the end of the pass;

both summed over ranks (``sync_dist=True, reduce_fx="sum"``), so the logged value is the
whole job's count. With aspect-ratio buckets (``data.buckets``) it also logs

* ``data/bucket_share/WxH`` — the share of the training samples of each bucket since this fit
  (re)started, over all ranks, from the image shapes of the batches (host metadata: no
  device sync; one all-reduce of the counts on the batches metrics are written on).

No host sync per batch: the batch's counters are on the device by the time the callback sees them,
so it keeps them there and reads them (one ``tolist``) and sums them over ranks (one all-reduce)
only on the batches Lightning writes metrics on (:func:`~mmdiff.callbacks.sync_cadence.metrics_written_now`).

Checkpoints hold every rank's count (``{"skipped_train": job total, "ranks": [rank 0, rank 1, ...]}``,
gathered from all ranks since rank 0 writes the file) and each rank restores its own, so the sum
over ranks after a resume is the job's total. A checkpoint from a different number of ranks, or one
written before per-rank counts (only rank 0's count), restores the whole saved count on rank 0.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from mmdiff.callbacks.sync_cadence import metrics_written_now, world_size

log = logging.getLogger(__name__)


def _pending(batch: Any) -> Optional[torch.Tensor]:
    """``[worker id, largest skip count]`` of a batch, left where the batch is (no host sync)."""
    if not isinstance(batch, Mapping):
        return None
    skipped, worker = batch.get("skipped"), batch.get("worker")
    if skipped is None or worker is None or len(skipped) == 0:
        return None
    return torch.stack([torch.as_tensor(worker[0], device=skipped.device).long(), skipped.max().long()])


def _fold(per_worker: Dict[int, int], pending: List[torch.Tensor]) -> None:
    """Fold the pending ``[worker, count]`` pairs into ``per_worker`` with one read of the device."""
    if not pending:
        return
    for wid, count in torch.stack(pending).tolist():
        per_worker[wid] = max(per_worker.get(wid, 0), count)
    pending.clear()


class DataStatsCallback(Callback):
    """Logs ``data/skipped_train`` and ``data/skipped_val`` (sums over workers and ranks), and the
    bucket shares of the training samples when the data has aspect-ratio buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.train_done = 0  # skips of earlier runs, restored from the checkpoint (this rank)
        self.train_pass: Dict[int, int] = {}  # per worker: its stream's count since it started
        self.val_pass: Dict[int, int] = {}
        self._train_pending: List[torch.Tensor] = []  # per batch [worker, count], not yet read
        self._val_pending: List[torch.Tensor] = []
        self._trainer: Optional[L.Trainer] = None
        self.buckets: List[Tuple[int, int]] = []  # (width, height), from the datamodule
        self.bucket_counts: List[int] = []  # training samples per bucket (this rank, this fit)

    @property
    def skipped_train(self) -> int:
        """This rank's training skips so far."""
        _fold(self.train_pass, self._train_pending)
        return self.train_done + sum(self.train_pass.values())

    @property
    def skipped_val(self) -> int:
        """This rank's skips in the current (or last) validation pass."""
        _fold(self.val_pass, self._val_pending)
        return sum(self.val_pass.values())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # setup runs before Lightning restores callback states: ranks
        buckets = getattr(getattr(trainer, "datamodule", None), "buckets", None)
        self.buckets = list(buckets.sizes) if buckets is not None else []
        self.bucket_counts = [0] * len(self.buckets)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        pending = _pending(batch)
        if pending is not None:
            self._train_pending.append(pending)
        if self.buckets and isinstance(batch, Mapping) and "image" in batch:
            height, width = batch["image"].shape[-2:]
            if (width, height) in self.buckets:
                self.bucket_counts[self.buckets.index((width, height))] += int(batch["image"].shape[0])
        if not metrics_written_now(trainer):
            return
        if self.buckets:
            self._log_bucket_shares(pl_module)
        # Every rank reaches here on the same batches (step counters only), so the all-reduce of
        # `sync_dist` always matches up; a rank whose batches carry no counts sends its total too.
        value = torch.tensor(float(self.skipped_train), device=pl_module.device)
        pl_module.log("data/skipped_train", value, on_step=True, on_epoch=False,
                      reduce_fx="sum", sync_dist=True, batch_size=1)

    def _log_bucket_shares(self, pl_module: L.LightningModule) -> None:
        counts = torch.tensor(self.bucket_counts, dtype=torch.float64, device=pl_module.device)
        if world_size() > 1:  # every rank gets here on the same batch (metrics_written_now)
            dist.all_reduce(counts)
        shares = counts / counts.sum().clamp(min=1)
        for (width, height), share in zip(self.buckets, shares):
            pl_module.log(f"data/bucket_share/{width}x{height}", share.float(), on_step=True, on_epoch=False,
                          batch_size=1)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_pass = {}
        self._val_pending = []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pending = _pending(batch)
        if pending is not None:
            self._val_pending.append(pending)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = torch.tensor(float(self.skipped_val), device=pl_module.device)
        pl_module.log("data/skipped_val", value, on_step=False, on_epoch=True,
                      reduce_fx="sum", sync_dist=True, batch_size=1)

    def state_dict(self) -> Dict[str, Any]:
        ranks: List[Any] = [int(self.skipped_train)]
        if world_size() > 1:  # every rank runs this when a checkpoint is saved; rank 0 writes it
            ranks = [None] * world_size()
            dist.all_gather_object(ranks, int(self.skipped_train))
        return {"skipped_train": sum(ranks), "ranks": ranks}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        ranks = state_dict.get("ranks")
        if isinstance(ranks, list) and len(ranks) == world:
            self.train_done = int(ranks[rank])
        else:
            if isinstance(ranks, list) and rank == 0:
                log.info("the checkpoint holds the skip counts of %d rank(s), this run has %d: "
                         "rank 0 continues from their total", len(ranks), world)
            # A job total (or, in checkpoints without "ranks", rank 0's own count) must be counted
            # once in the sum over ranks: rank 0 carries it.
            self.train_done = int(state_dict.get("skipped_train", 0)) if rank == 0 else 0
        self.train_pass = {}
        self._train_pending = []
