"""Training checkpoints: the Lightning ``CheckpointIO`` every mmdiff trainer uses (atomic, synced
writes), and :func:`read_training_checkpoint`, the one reader of what it wrote.

``build_trainer`` passes :class:`AtomicCheckpointIO` as a plugin, so every checkpoint the trainer
writes — ``checkpoints/stepNNNNNNN.ckpt``, ``last.ckpt``, the SLURM requeue ``hpc_ckpt_N.ckpt`` —
under every strategy (single device, DDP, FSDP2 with full-state checkpoints) goes through
:func:`mmdiff.io.atomic.atomic_torch_save`: a killed process or a full disk leaves the previous
checkpoint intact. Lightning's own ``TorchCheckpointIO`` first serialises the whole checkpoint into
memory and writes it without ``fsync``; this one streams and syncs (hence a class of our own).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from mmdiff.config import from_container
from mmdiff.errors import CheckpointError
from mmdiff.io import atomic
from mmdiff.io.weights import safe_torch_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable (see :mod:`mmdiff.io.atomic`)."""

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not take storage_options, got {storage_options!r}"
            )
        atomic.atomic_torch_save(checkpoint, path)


def read_training_checkpoint(path: str | Path, mmap: bool = False) -> Tuple[Dict[str, Any], DictConfig]:
    """A checkpoint ``mmdiff fit`` wrote, and the config it was trained with.

    ``mmap=True`` maps the tensors instead of reading them (cheap checks of a large file).
    Raises :class:`CheckpointError` for any other file.
    """
    checkpoint = safe_torch_load(path, mmap=mmap)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"'{path}' is not an mmdiff training checkpoint (no state_dict in it).")
    hparams = checkpoint.get("hyper_parameters", {})
    if "config" not in hparams:
        raise CheckpointError(f"'{path}' was not written by mmdiff (no config in its hyper-parameters).")
    return checkpoint, from_container(hparams["config"])


__all__ = ["AtomicCheckpointIO", "read_training_checkpoint"]
