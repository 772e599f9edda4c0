"""One rank of a real 2-process ``mmdiff.run.training.fit`` (tests/scale/test_ddp_fit.py; not collected).

usage: python fit_worker.py CONFIG RANK WORLD PORT OUT_JSON [key=value ...]

Runs ``mmdiff.run.training.fit`` unchanged, with probes added through its build functions: the
system's ``log`` (what each rank computed before Lightning reduced it), ``validation_step`` and
``preview_images`` are counted per rank, and a callback records the reduced validation metrics.
Writes what this rank saw to OUT_JSON.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys


def main() -> None:
    config, rank, world, port, out_path, *overrides = sys.argv[1:]
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests/multiproc.py dumps our stacks on a timeout
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=world, RANK=rank,
                      LOCAL_RANK=rank, NODE_RANK="0")
    import lightning as L
    import torch

    torch.set_num_threads(1)
    import mmdiff.run.training as training
    from mmdiff.config import load_config

    seen = {"val_batches": 0, "previews": 0, "local_val_loss": [], "val_epochs": [], "train_batches": 0,
            "train_keys": [], "val_keys": []}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["train_batches"] += 1
            seen["train_keys"] += list(batch["key"])

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["val_keys"] += [k for k, ok in zip(batch["key"], batch["valid"].tolist()) if ok]

        def on_validation_epoch_end(self, trainer, pl_module):
            seen["val_epochs"].append({"step": trainer.global_step, "local": list(seen["local_val_loss"])})
            seen["local_val_loss"].clear()

        def on_train_end(self, trainer, pl_module):
            seen["reduced_val_loss"] = float(trainer.callback_metrics["val/loss"])
            seen["global_step"] = trainer.global_step

    build_system, build_callbacks = training.build_system, training.build_callbacks

    def probed_system(cfg, resume_hparams=None):
        system = build_system(cfg, resume_hparams)
        log, val_step, preview = system.log, system.validation_step, system.preview_images

        def probed_log(name, value, *args, **kwargs):
            if name == "val/loss":
                seen["local_val_loss"].append(float(value))
            return log(name, value, *args, **kwargs)

        def probed_val_step(batch, batch_idx):
            seen["val_batches"] += 1
            return val_step(batch, batch_idx)

        def probed_preview():
            seen["previews"] += 1
            return preview()

        system.log, system.validation_step, system.preview_images = probed_log, probed_val_step, probed_preview
        return system

    training.build_system = probed_system
    training.build_callbacks = lambda cfg, run_dir, system: build_callbacks(cfg, run_dir, system) + [Probe()]
    cfg = load_config(config, [f"trainer.devices={world}", *overrides])
    training.fit(cfg)
    with open(out_path, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
