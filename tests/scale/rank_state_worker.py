"""One rank of the two-process rank-state test (run by test_rank_state.py, not collected by pytest).

usage: python rank_state_worker.py RANK WORLD PORT OUT_JSON

Over a real gloo group: DataStatsCallback saves both ranks' skip counts and each rank restores its
own; NaNGuard's one all-reduce makes a bad step on rank 1 a skip on both; RequeueOnSignal's
asynchronous flag makes a signal on rank 1 a save on both, one batch later.
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist


def main() -> None:
    rank, world, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests/multiproc.py dumps our stacks on a timeout
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    from mmdiff.callbacks.data_stats import DataStatsCallback
    from mmdiff.callbacks.nan_guard import NaNGuard
    from mmdiff.callbacks.requeue import RequeueOnSignal

    trainer = SimpleNamespace(global_rank=rank, world_size=world,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    out: dict = {}

    # skip counts: rank r skipped 3 + 4r samples and dropped 10 + r by a filter on 'aesthetic';
    # save (all ranks, as Lightning does), restore
    stats = DataStatsCallback(["aesthetic"])
    stats.setup(trainer, None, "fit")
    stats.train_pass = {0: [3 + 4 * rank, 10 + rank]}
    saved = stats.state_dict()
    resumed = DataStatsCallback(["aesthetic"])
    resumed.setup(trainer, None, "fit")
    resumed.load_state_dict(saved)
    out["saved"] = saved
    out["restored"] = resumed.skipped_train
    out["restored_dropped"] = resumed.dropped_train
    old = DataStatsCallback()  # a checkpoint from before per-rank counts: rank 0's count only
    old.setup(trainer, None, "fit")
    old.load_state_dict({"skipped_train": 3})
    out["restored_old"] = old.skipped_train

    # NaN guard: rank 1's loss is non-finite, rank 0's is fine: both skip
    flags = [torch.tensor(rank == 1)]
    out["guard_bad"] = NaNGuard._any_rank_bad(flags, torch.device("cpu"))
    out["guard_good"] = NaNGuard._any_rank_bad([torch.tensor(False)], torch.device("cpu"))

    # requeue: rank 1 gets the signal before batch 2 ends; every rank learns it at batch 3's end
    requeue = RequeueOnSignal()
    seen = []
    for batch in range(5):
        if rank == 1 and batch == 2:
            requeue._handler(signal.SIGUSR1, None)
        seen.append(requeue._agreed(trainer))
    requeue.on_train_end(trainer, None)
    out["requeue_seen"] = seen
    with open(out_path, "w") as f:
        json.dump(out, f)
    # No rank tears its connections down while the other may still be finishing the last collective
    # (gloo then aborts the slower process: "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
