"""``DataStatsCallback``: how many samples the data pipeline skipped (corrupt) or dropped (by rule), as metrics.

Batches from :mod:`mmdiff.data` carry ``skipped`` (the cumulative skip count of the DataLoader
worker that made the batch: since its training stream started — once per fit, the workers
persist across epochs — or within the validation pass) and ``worker``. This callback keeps the
largest value per (split, worker), sums over workers, and logs

* ``data/skipped_train`` — total since the start of training (all epochs, and earlier runs when
  resumed from a checkpoint), every step;
* ``data/skipped_val``   — total of the last validation pass, at the end of the pass;
* ``data/dropped/NAME``  — for each drop counter (``data.min_size``, each field of ``data.filters``:
  :func:`mmdiff.config.filter_rules.drop_names`), training samples that rule dropped, counted like
  ``data/skipped_train`` from the batches' ``dropped`` column NAME;

all summed over ranks (``sync_dist=True, reduce_fx="sum"``), so the logged value is the
whole job's count. With aspect-ratio buckets (``data.buckets``) it also logs

* ``data/bucket_share/WxH`` — the share of the training samples of each bucket since this fit
  (re)started, over all ranks, from the image shapes of the batches (host metadata: no
  device sync; one all-reduce of the counts on the batches metrics are written on).

No host sync per batch: the batch's counters are on the device by the time the callback sees them,
so it keeps them there and reads them (one ``tolist``) and sums them over ranks (one all-reduce)
only on the batches Lightning writes metrics on (:func:`~mmdiff.callbacks.sync_cadence.metrics_written_now`).

Checkpoints hold every rank's count (``{"skipped_train": job total, "ranks": [rank 0, rank 1, ...]}``,
plus ``"dropped": {NAME: [rank 0, rank 1, ...]}`` when there are drop counters; gathered from all
ranks since rank 0 writes the file) and each rank restores its own, so the sum over ranks after a
resume is the job's total. A checkpoint from a different number of ranks, or one
written before per-rank counts (only rank 0's count), restores the whole saved count on rank 0.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from mmdiff.callbacks.sync_cadence import metrics_written_now, world_size

log = logging.getLogger(__name__)


def _pending(batch: Any, n_drops: int) -> Optional[torch.Tensor]:
    """``[worker id, largest skip count, largest count of each drop counter]`` of a batch, left
    where the batch is (no host sync)."""
    if not isinstance(batch, Mapping):
        return None
    skipped, worker = batch.get("skipped"), batch.get("worker")
    if skipped is None or worker is None or len(skipped) == 0:
        return None
    dropped = batch.get("dropped")
    if n_drops and dropped is not None and dropped.shape[-1] == n_drops:
        drops = dropped.max(dim=0).values.long()
    else:
        drops = torch.zeros(n_drops, dtype=torch.long, device=skipped.device)
    head = torch.stack([torch.as_tensor(worker[0], device=skipped.device).long(), skipped.max().long()])
    return torch.cat([head, drops])


def _fold(per_worker: Dict[int, List[int]], pending: List[torch.Tensor]) -> None:
    """Fold the pending ``[worker, counts...]`` rows into ``per_worker`` (the largest of each count:
    they are cumulative) with one read of the device."""
    if not pending:
        return
    for wid, *counts in torch.stack(pending).tolist():
        old = per_worker.get(wid)
        per_worker[wid] = counts if old is None else [max(a, b) for a, b in zip(old, counts)]
    pending.clear()


class DataStatsCallback(Callback):
    """Logs ``data/skipped_train``, ``data/skipped_val`` and ``data/dropped/NAME`` for each of
    ``drop_names`` (sums over workers and ranks), and the bucket shares of the training samples
    when the data has aspect-ratio buckets."""

    def __init__(self, drop_names: Sequence[str] = ()) -> None:
        super().__init__()
        self.drop_names = list(drop_names)
        # Skips, then drops per name, of earlier runs, restored from the checkpoint (this rank).
        self.train_done = [0] * (1 + len(self.drop_names))
        self.train_pass: Dict[int, List[int]] = {}  # per worker: its stream's counts since it started
        self.val_pass: Dict[int, List[int]] = {}
        self._train_pending: List[torch.Tensor] = []  # per batch [worker, count], not yet read
        self._val_pending: List[torch.Tensor] = []
        self._trainer: Optional[L.Trainer] = None
        self.buckets: List[Tuple[int, int]] = []  # (width, height), from the datamodule
        self.bucket_counts: List[int] = []  # training samples per bucket (this rank, this fit)

    @property
    def skipped_train(self) -> int:
        """This rank's training skips so far."""
        return self._train_counts()[0]

    @property
    def dropped_train(self) -> Dict[str, int]:
        """This rank's training drops so far, per drop counter."""
        return dict(zip(self.drop_names, self._train_counts()[1:]))

    def _train_counts(self) -> List[int]:
        _fold(self.train_pass, self._train_pending)
        return [sum(c) for c in zip(self.train_done, *self.train_pass.values())]

    @property
    def skipped_val(self) -> int:
        """This rank's skips in the current (or last) validation pass."""
        _fold(self.val_pass, self._val_pending)
        return sum(counts[0] for counts in self.val_pass.values())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # setup runs before Lightning restores callback states: ranks
        buckets = getattr(getattr(trainer, "datamodule", None), "buckets", None)
        self.buckets = list(buckets.sizes) if buckets is not None else []
        self.bucket_counts = [0] * len(self.buckets)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        pending = _pending(batch, len(self.drop_names))
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
        counts = self._train_counts()
        for name, count in zip(["skipped_train"] + [f"dropped/{n}" for n in self.drop_names], counts):
            value = torch.tensor(float(count), device=pl_module.device)
            pl_module.log(f"data/{name}", value, on_step=True, on_epoch=False,
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
        pending = _pending(batch, 0)
        if pending is not None:
            self._val_pending.append(pending)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = torch.tensor(float(self.skipped_val), device=pl_module.device)
        pl_module.log("data/skipped_val", value, on_step=False, on_epoch=True,
                      reduce_fx="sum", sync_dist=True, batch_size=1)

    def state_dict(self) -> Dict[str, Any]:
        counts: List[Any] = [[int(c) for c in self._train_counts()]]
        if world_size() > 1:  # every rank runs this when a checkpoint is saved; rank 0 writes it
            counts = [None] * world_size()
            dist.all_gather_object(counts, [int(c) for c in self._train_counts()])
        ranks = [c[0] for c in counts]
        state: Dict[str, Any] = {"skipped_train": sum(ranks), "ranks": ranks}
        if self.drop_names:
            state["dropped"] = {name: [c[1 + i] for c in counts] for i, name in enumerate(self.drop_names)}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        ranks = state_dict.get("ranks")
        if isinstance(ranks, list) and len(ranks) == world:
            skipped = int(ranks[rank])
        else:
            if isinstance(ranks, list) and rank == 0:
                log.info("the checkpoint holds the skip counts of %d rank(s), this run has %d: "
                         "rank 0 continues from their total", len(ranks), world)
            # A job total (or, in checkpoints without "ranks", rank 0's own count) must be counted
            # once in the sum over ranks: rank 0 carries it.
            skipped = int(state_dict.get("skipped_train", 0)) if rank == 0 else 0
        dropped = state_dict.get("dropped", {})
        self.train_done = [skipped] + [_own_share(dropped.get(name), rank, world) for name in self.drop_names]
        self.train_pass = {}
        self._train_pending = []


def _own_share(per_rank: Any, rank: int, world: int) -> int:
    """This rank's saved count; the total on rank 0 when the saved ranks differ from this run's."""
    if not isinstance(per_rank, list):
        return 0
    if len(per_rank) == world:
        return int(per_rank[rank])
    return sum(int(c) for c in per_rank) if rank == 0 else 0
