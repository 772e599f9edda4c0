"""The torch device a command runs on, from what the user typed (``--device``)."""
from __future__ import annotations

import torch

from mmdiff.errors import UsageError


def resolve_device(device: str = "auto", local_rank: int = 0, allow_gpu: bool = True) -> torch.device:
    """``auto`` → this rank's CUDA device when there is one (and ``allow_gpu``), else the CPU.

    Any other name must be a device torch can use on this machine; an unknown name, or a GPU that
    is not there, is a one-line :class:`UsageError` before a model is moved anywhere.
    """
    if device == "auto":
        if allow_gpu and torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto.") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"device '{device}': torch sees no CUDA device on this machine; use cpu or auto.")
        if chosen.index is not None and chosen.index >= count:
            raise UsageError(f"device '{device}': this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{device}': MPS is not available on this machine; use cpu or auto.")
    return chosen


__all__ = ["resolve_device"]
