"""The Lightning ``CheckpointIO`` every mmdiff trainer uses: atomic, synced checkpoint writes.

``build_trainer`` passes :class:`AtomicCheckpointIO` as a plugin, so every checkpoint the trainer
writes — ``checkpoints/stepNNNNNNN.ckpt``, ``last.ckpt``, the SLURM requeue ``hpc_ckpt_N.ckpt`` —
under every strategy (single device, DDP, FSDP2 with full-state checkpoints) goes through
:func:`mmdiff.io.atomic.atomic_torch_save`: a killed process or a full disk leaves the previous
checkpoint intact. Lightning's own ``TorchCheckpointIO`` first serialises the whole checkpoint into
memory and writes it without ``fsync``; this one streams and syncs (hence a class of our own).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmdiff.io import atomic


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


__all__ = ["AtomicCheckpointIO"]
