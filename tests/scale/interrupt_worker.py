"""``mmdiff fit CONFIG`` that holds still once its step-STEP checkpoint is written, to be signalled
(tests/scale/test_exact_resume.py; not collected by pytest).

usage: python interrupt_worker.py STEP MARKER CONFIG [fit arguments ...]

At the start of the batch after step STEP (Lightning's ModelCheckpoint saves at the end of the step's batch)
every rank writes MARKER.<rank> and waits: for SIGKILL, or after SIGTERM returns, so that the
run saves and stops at the end of that batch (mmdiff's RequeueOnSignal). The test signals once
every marker is there, so what it checks never depends on how fast the run is.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> None:
    step, marker, *args = sys.argv[1:]
    import lightning as L

    import mmdiff.run.training as training
    from mmdiff.callbacks.requeue import RequeueOnSignal
    from mmdiff.cli import main as cli

    def terminated(trainer: L.Trainer) -> bool:
        stops = [c for c in trainer.callbacks if isinstance(c, RequeueOnSignal)]
        return trainer.received_sigterm or any(c.sigterm_received for c in stops)

    class HoldAfterCheckpoint(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == int(step):
                Path(f"{marker}.{trainer.global_rank}").touch()
                while not terminated(trainer):
                    time.sleep(0.05)

    build_callbacks = training.build_callbacks
    training.build_callbacks = lambda cfg, run_dir, system: build_callbacks(cfg, run_dir, system) + [HoldAfterCheckpoint()]
    sys.exit(cli(["fit", *args]))


if __name__ == "__main__":
    main()
