"""Stand-in for `mmdiff fit` under srun: report this rank and join a 2-process gloo all-reduce.

Run by tests/slurm/test_sbatch.py as ``MMDIFF_CMD="python tests/slurm/rank_probe.py"``; prints one
line per rank, ``PROBE rank=R world=W local=L alloc_world=A tasks_per_node=T sum=S args=...``, where
``sum`` is the all-reduced sum of (rank + 1) over all ranks, proving MASTER_ADDR/MASTER_PORT from
slurm/train.sbatch let the ranks meet.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    from mmdiff.run.cluster import slurm_allocation

    rank = int(os.environ["SLURM_PROCID"])
    world = int(os.environ["SLURM_NTASKS"])
    alloc = slurm_allocation() or {}
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    dist.barrier()  # no rank closes its connections while another is still in the last collective
    dist.destroy_process_group()
    print(
        f"PROBE rank={rank} world={world} local={os.environ.get('SLURM_LOCALID')} "
        f"alloc_world={alloc.get('world_size')} tasks_per_node={alloc.get('tasks_per_node')} "
        f"sum={int(value.item())} args={' '.join(argv)}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
