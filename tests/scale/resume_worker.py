"""One rank of a 2-process ``mmdiff fit`` of the toy system (tests/scale/test_resume_ranks.py; not collected).

usage: python resume_worker.py CONFIG RANK WORLD PORT DELAY_S [fit arguments ...]

Waits DELAY_S seconds, then runs ``mmdiff fit CONFIG`` as rank RANK of WORLD (DDP over gloo), so a
test can let another rank reach the run directory first.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    config, rank, world, port, delay, *args = sys.argv[1:]
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests/multiproc.py dumps our stacks on a timeout
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=world, RANK=rank,
                      LOCAL_RANK=rank, NODE_RANK="0")
    time.sleep(float(delay))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    torch.set_num_threads(1)
    import tiny_configs  # noqa: F401  (registers the toy system)
    from mmdiff.cli import main as mmdiff_main

    return mmdiff_main(["fit", config, f"trainer.devices={world}", "trainer.strategy=ddp", *args])


if __name__ == "__main__":
    sys.exit(main())
