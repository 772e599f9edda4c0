"""One rank of the two-process data test (run by test_data_distributed.py, not collected by pytest).

usage: python ddp_worker.py RANK WORLD PORT SPEC_JSON OUT_JSON

For each scenario in SPEC_JSON ({name: {"train": [...], "val": [...], "workers": n, "data": {...}}},
"data" optional: more data.* keys), draws one
training epoch and one validation pass through ShardDataModule, all-reducing once per validation
batch (as DDP does), and writes the keys each rank saw to OUT_JSON.
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import sys

import torch
import torch.distributed as dist


def fit_with_ddp(rank: int, spec: dict) -> dict:
    """A short Lightning DDP fit (processes launched by us) with DataStatsCallback."""
    import lightning as L
    from omegaconf import OmegaConf
    from torch import nn

    from mmdiff.callbacks.data_stats import DataStatsCallback
    from mmdiff.config import DataConfig
    from mmdiff.data.datamodule import ShardDataModule

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.val_batches = 0

        def training_step(self, batch, batch_idx):
            return self.lin(batch["image"].mean(dim=(2, 3))).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.val_batches += 1
            self.log("val/x", self.lin(batch["image"].mean(dim=(2, 3))).mean(), sync_dist=True,
                     batch_size=len(batch["key"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "train_shards": spec["train"], "val_shards": spec["val"], "image_size": 16, "batch_size": 2,
        "val_batch_size": 2, "steps_per_epoch": 3, "num_workers": 0})
    model = Tiny()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, num_sanity_val_steps=0, callbacks=[DataStatsCallback()])
    trainer.fit(model, datamodule=ShardDataModule(cfg, seed=0))
    metrics = trainer.callback_metrics
    return {"skipped_val": metrics["data/skipped_val"].item(),
            "skipped_train": metrics["data/skipped_train"].item(), "val_batches": model.val_batches}


def main() -> None:
    rank, world, port, spec_path, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests/multiproc.py dumps our stacks on a timeout
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    from omegaconf import OmegaConf

    from mmdiff.config import DataConfig
    from mmdiff.data.datamodule import ShardDataModule
    from mmdiff.data.skips import count_skipped

    results = {}
    for name, spec in json.loads(open(spec_path).read()).items():
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {
            "train_shards": spec["train"], "val_shards": spec["val"], "image_size": 16,
            "batch_size": 4, "val_batch_size": 5, "steps_per_epoch": 6, "num_workers": spec["workers"],
            "shuffle_buffer": 20,
        }, spec.get("data", {}))
        dm = ShardDataModule(cfg, seed=0)
        dm.setup("fit")
        train = [k for b in dm.train_dataloader() for k in b["key"]]
        val_keys, val_batches, skipped = [], 0, 0
        loader = dm.val_dataloader()
        batches, shapes = [], []
        for batch in loader:
            dist.all_reduce(torch.ones(1))  # lockstep: hangs (then times out) if ranks' counts differ
            val_batches += 1
            batches.append(batch)
            val_keys += [k for k, ok in zip(batch["key"], batch["valid"].tolist()) if ok]
            shapes.append(list(batch["image"].shape[2:]))
        skipped = count_skipped(batches)
        dist.barrier()
        results[name] = {"train": train, "val": val_keys, "val_batches": val_batches,
                         "val_len": len(loader), "val_skipped": skipped, "val_shapes": shapes}
    results["fit"] = fit_with_ddp(rank, json.loads(open(spec_path).read())["single"])
    with open(out_path, "w") as f:
        json.dump(results, f)
    dist.barrier()  # no rank closes its connections while another is still in the last collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
