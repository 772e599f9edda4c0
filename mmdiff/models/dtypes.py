"""Small helpers shared by the model builders."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: Any) -> torch.dtype:
    """The torch dtype for a ``Precision`` enum member or its name (fp32 | bf16 | fp16)."""
    name = getattr(precision, "value", precision)
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"unknown precision '{name}'; choose one of fp32, bf16, fp16.") from None


def diffusers_folder(path: Path, subfolder: str) -> tuple[Path, str | None]:
    """``(folder, subfolder)`` for ``from_pretrained``: a model folder, or a pipeline folder
    whose ``subfolder`` (e.g. ``vae``, ``unet``) holds the model."""
    if (path / "config.json").is_file():
        return path, None
    if (path / subfolder / "config.json").is_file():
        return path, subfolder
    return path, None


__all__ = ["precision_dtype", "diffusers_folder"]
