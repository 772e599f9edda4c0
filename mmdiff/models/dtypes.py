"""Small helpers shared by the model builders."""
from __future__ import annotations

from pathlib import Path
import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype for a precision name (fp32 | bf16 | fp16)."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision '{precision}'; choose one of fp32, bf16, fp16.") from None


def diffusers_folder(path: Path, subfolder: str) -> tuple[Path, str | None]:
    """``(folder, subfolder)`` for ``from_pretrained``: a model folder, or a pipeline folder
    whose ``subfolder`` (e.g. ``vae``, ``unet``) holds the model."""
    if (path / "config.json").is_file():
        return path, None
    if (path / subfolder / "config.json").is_file():
        return path, subfolder
    return path, None


__all__ = ["precision_dtype", "diffusers_folder"]
