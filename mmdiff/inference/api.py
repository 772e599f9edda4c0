"""Notebook-friendly entry points: ``mmdiff.load(ckpt).sample(prompts)``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional


from mmdiff.callbacks.ema import load_ema_into
from mmdiff.run.checkpoint_io import read_training_checkpoint
from mmdiff.run.devices import resolve_device
from mmdiff.errors import CheckpointError
from mmdiff.systems.base import System
from mmdiff.systems.registry import get_system, system_names

log = logging.getLogger(__name__)


def load(
    ckpt_path: str | Path,
    *,
    expect: Optional[str] = None,
    use_ema: bool = True,
    device: str = "auto",
) -> System:
    """Rebuild a trained system from its Lightning checkpoint, in eval mode.

    ``expect`` names the system the caller needs (e.g. ``"text_to_image"``); a checkpoint of
    another kind is refused with a one-line error. EMA weights are swapped in when present.
    """
    path = Path(ckpt_path)
    target_device = resolve_device(device)  # a device that is not here fails before the file is read
    checkpoint, cfg = read_training_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    if expect is not None and cfg.system != expect:
        raise CheckpointError(
            f"'{path}' is a '{cfg.system}' checkpoint; this command needs a '{expect}' one."
        )
    if cfg.system not in system_names():  # only registry names: nothing is imported by name
        raise CheckpointError(f"'{path}' names an unknown system '{cfg.system}'; it was not written by mmdiff.")
    system_cls = get_system(cfg.system)
    system = system_cls.from_checkpoint_config(cfg, hparams)
    system.load_weights(checkpoint["state_dict"], what=f"checkpoint '{path}'")
    target = system.ema_target
    system.ema_loaded = bool(use_ema and target is not None and load_ema_into(target, checkpoint))
    if system.ema_loaded:
        log.info("using EMA weights from %s", path)
    system.global_step_loaded = int(checkpoint.get("global_step", 0))
    return system.to(target_device).eval()
