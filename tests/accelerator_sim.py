"""Catch float64 tensors made on an accelerator without one: the "accelerator" is torch's ``meta``
device (import with ``tests/`` on ``sys.path``).

Inside :class:`Float64OnDevice`, every op result and factory call is checked; a float64 tensor on
a non-CPU device is recorded in ``made``. Copies from ``meta`` to the CPU (and ``.item()``) return
ones, and random draws with a :class:`MetaGenerator` run on the CPU, so code that summarises on
the CPU can run to its end.
"""
from __future__ import annotations

from typing import Any, List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MetaGenerator(torch.Generator):
    """A CPU generator that says it lives on the ``meta`` device (as a CUDA generator would)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("meta")


class _Factories(TorchFunctionMode):
    def __init__(self, made: List[str]) -> None:
        super().__init__()
        self.made = made

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type != "cpu" and kwargs.get("dtype") == torch.float64:
            self.made.append(f"{getattr(func, '__name__', func)} on {device}")
        if isinstance(kwargs.get("generator"), MetaGenerator):
            kwargs["device"] = "cpu"  # the draw itself happens on the generator's real device
        return func(*args, **kwargs)


class _Ops(TorchDispatchMode):
    def __init__(self, made: List[str]) -> None:
        super().__init__()
        self.made = made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source.device.type == "meta":
            if func is torch.ops.aten._local_scalar_dense.default:
                return 1
            target = kwargs.get("device")
            if func is torch.ops.aten._to_copy.default and target is not None and torch.device(target).type == "cpu":
                return torch.ones(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu":
                self.made.append(f"{func} on {t.device}")
        return out


class Float64OnDevice:
    """Context manager; ``made`` lists the float64 tensors created off the CPU."""

    def __init__(self) -> None:
        self.made: List[str] = []
        self._modes: List[Any] = []

    def __enter__(self) -> "Float64OnDevice":
        self._modes = [_Factories(self.made), _Ops(self.made)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
