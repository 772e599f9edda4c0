"""Safe loading of weights from user paths: never unpickle code, always load strictly.

Everything mmdiff reads from a path a user typed goes through here:

- :func:`safe_torch_load` — ``torch.load(weights_only=True)``; a pickle that would import or call
  anything outside torch's allow-list is refused with a :class:`~mmdiff.errors.CheckpointError`
  that says so, before any of its code runs.
- :func:`load_state_dict_file` — a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin``/``.ckpt``
  file holding a state dict (a Lightning checkpoint's ``"state_dict"`` is unwrapped).
- :func:`load_strict` — ``module.load_state_dict(strict=True)`` with a one-sentence report of the
  first few missing, unexpected and wrongly shaped keys instead of torch's wall of text.
"""
from __future__ import annotations

import fnmatch
import logging
import pickle
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from safetensors import SafetensorError
from safetensors.torch import load_file
import torch
from torch import nn

from mmdiff.errors import CheckpointError

log = logging.getLogger(__name__)

# How many keys of each kind an error message lists before it says "and N more".
_SHOW = 4


def _require_file(path: str | Path, what: str = "checkpoint") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what} '{path}' does not exist; check the path.")
    if not p.is_file():
        raise CheckpointError(f"{what} '{path}' is not a file; pass the path of a weights file.")
    return p


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with user-facing errors.

    Raises :class:`CheckpointError` when the file is missing, is not a PyTorch checkpoint, or
    holds a pickle that references anything outside torch's safe allow-list (such a file is
    refused for safety, and none of its code runs). ``mmap=True`` maps the tensors from the file
    instead of reading them.
    """
    p = _require_file(path)
    try:
        return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise unpickling_refusal(path, err) from None
    except Exception as err:  # zip/pickle errors of every kind mean "not a checkpoint"
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {first})."
        ) from None


def unpickling_refusal(path: str | Path, err: pickle.UnpicklingError) -> CheckpointError:
    """The one-sentence :class:`CheckpointError` for an ``UnpicklingError`` of a weights-only load.

    The weights-only unpickler names the global it would not import (``os.system``, a custom
    class, ...): that is the "would run code" case. Other unpickling errors are bytes that are not
    a pickle the weights-only loader can read (nothing ran either way).
    """
    text = str(err)
    blocked = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), "")
    if blocked:
        return CheckpointError(
            f"checkpoint '{path}' was refused for safety: it references code or objects that "
            f"torch.load(weights_only=True) does not allow ({blocked}); only load files from "
            "sources you trust, or re-export the weights as .safetensors."
        )
    first = next(
        (ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported")),
        "not a pickle the weights-only loader can read",
    )
    return CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({first}).")


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"'{path}' is not a valid .safetensors file ({first}).") from None


def load_state_dict_file(path: str | Path) -> Dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from a ``.safetensors`` or torch checkpoint file.

    For torch files, a Lightning / CompVis checkpoint's ``"state_dict"`` entry is unwrapped; any
    other mapping must hold tensors directly.
    """
    p = _require_file(path, "weights file")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    obj = safe_torch_load(p)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"'{path}' holds no state dict of tensors; pass a weights file.")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"'{path}' holds no tensors; pass a weights file.")
    return tensors


def _listed(keys: List[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", … and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def ignored_key(key: str, patterns: Iterable[str]) -> bool:
    """True when ``key`` equals one of ``patterns`` or matches it as an fnmatch pattern."""
    return any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


def describe_mismatch(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore_keys: Iterable[str] = ()
) -> Optional[str]:
    """A short description of how ``state_dict`` fails to fit ``module``, or None if it fits."""
    ignore_keys = tuple(ignore_keys)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not ignored_key(k, ignore_keys)]
    unexpected = [k for k in state_dict if k not in expected and not ignored_key(k, ignore_keys)]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_listed(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ({_listed(shapes)})")
    return "; ".join(parts) or None


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    ignore_keys: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``module``; every key must match in name and shape.

    ``ignore_keys`` are exact names or ``fnmatch`` patterns that may be missing from, or extra
    in, the file. On a mismatch raises :class:`CheckpointError` naming ``what`` and the first few
    offending keys; the module is left unchanged.
    """
    ignore_keys = tuple(ignore_keys)
    problem = describe_mismatch(module, state_dict, ignore_keys)
    if problem:
        raise CheckpointError(
            f"{what} weights do not fit the model: {problem}; check that the architecture in the "
            "config matches the weights file."
        )
    filtered = {k: v for k, v in state_dict.items() if not ignored_key(k, ignore_keys)}
    module.load_state_dict(filtered, strict=not ignore_keys)


__all__ = ["safe_torch_load", "unpickling_refusal", "load_state_dict_file", "load_strict", "describe_mismatch",
           "ignored_key"]
