"""Per-rank state and host syncs: skip counts restored per rank, one rank creates the W&B id file,
and the every-batch callbacks read the device (and talk to other ranks) as little as promised."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from multiproc import free_port, run_all
from mmdiff.callbacks.data_stats import DataStatsCallback
from mmdiff.callbacks.nan_guard import NaNGuard
from mmdiff.callbacks.requeue import RequeueOnSignal

HERE = Path(__file__).resolve().parent
# no launcher/cluster settings leak into the ranks (inline: `conftest` names differ per test folder)
_LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                  "MASTER_ADDR", "MASTER_PORT")
CALLBACKS = str(Path(DataStatsCallback.__module__.replace(".", "/")).parent)  # "mmdiff/callbacks"


@pytest.mark.xdist_group("multirank")  # make test: one xdist worker runs these one after another
@pytest.mark.timeout(120)
def test_two_ranks_keep_their_own_counts_and_agree_on_flags(tmp_path: Path) -> None:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_KEYS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1")
    run_all([[sys.executable, str(HERE / "rank_state_worker.py"), str(rank), "2", port,
              str(tmp_path / f"rank{rank}.json")] for rank in range(2)], tmp_path / "logs", env, 100)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # what rank 0 writes
    assert r0["saved"] == {"skipped_train": 3 + 7, "ranks": [3, 7], "dropped": {"aesthetic": [10, 11]}}
    assert (r0["restored"], r1["restored"]) == (3, 7)  # the logged sum after a resume is 10, not 2 × 3
    assert (r0["restored_dropped"], r1["restored_dropped"]) == ({"aesthetic": 10}, {"aesthetic": 11})
    assert (r0["restored_old"], r1["restored_old"]) == (3, 0)  # an old checkpoint's count, once
    assert r0["guard_bad"] is r1["guard_bad"] is True
    assert r0["guard_good"] is r1["guard_good"] is False
    assert r0["requeue_seen"] == r1["requeue_seen"] == [0, 0, 0, 1, 1]  # 1: a requeue request


def test_other_world_size_restores_the_total_on_rank_zero() -> None:
    from types import SimpleNamespace

    restored = []
    for rank in range(4):
        cb = DataStatsCallback(["aesthetic", "min_size"])
        cb.setup(SimpleNamespace(global_rank=rank, world_size=4), None, "fit")
        cb.load_state_dict({"skipped_train": 10, "ranks": [3, 7], "dropped": {"aesthetic": [5, 6]}})
        restored.append((cb.skipped_train, cb.dropped_train))
    assert restored == [(10, {"aesthetic": 11, "min_size": 0})] + [(0, {"aesthetic": 0, "min_size": 0})] * 3


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _batches(n: int):
    # batches as the shard loader makes them: per-worker cumulative skip counts and worker ids
    return [{"x": torch.randn(2, 4), "skipped": torch.tensor([i // 3, i // 3]), "worker": torch.tensor([0, 0])}
            for i in range(n)]


def test_callbacks_read_the_device_once_per_step_at_most(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts every host read of a tensor (item, bool, int, float, tolist) made from mmdiff/callbacks
    during a one-process fit: the NaN guard one per optimiser step, the data statistics one per
    logging step, the requeue flag none."""
    reads: Dict[str, int] = {}

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if CALLBACKS in caller:
                key = Path(caller).name
                reads[key] = reads.get(key, 0) + 1
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    steps, every = 12, 4
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=steps, accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=every,
                        callbacks=[DataStatsCallback(), NaNGuard(), RequeueOnSignal()])
    trainer.fit(_Tiny(), train_dataloaders=DataLoader(_batches(steps), batch_size=None))
    assert reads.get("nan_guard.py") == steps
    assert reads.get("data_stats.py") == steps // every  # one tolist per logging step
    assert "requeue.py" not in reads
    assert trainer.callback_metrics["data/skipped_train"].item() == (steps - 1) // 3
