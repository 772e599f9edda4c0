"""Exponential moving average of a system's ``ema_target`` module, kept in the checkpoint.

The shadow weights live in the callback's state (``checkpoint["callbacks"]["EMA"]``), so resuming
restores them and ``mmdiff sample`` can swap them in without building an optimiser.

Under FSDP2 (``trainer.strategy: fsdp``) the parameters are sharded DTensors: each rank keeps the
shadow of its own shards, and the checkpoint holds full tensors (gathered on save, every rank
takes part since Lightning collects callback states on all ranks; re-sharded on resume).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import lightning as L
import torch
from torch import nn

from mmdiff.callbacks.nan_guard import step_was_skipped
from mmdiff.callbacks.sharding import is_dtensor, local_shard

EMA_STATE_KEY = "EMA"


def _local(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    return [local_shard(t) for t in tensors]


class EMACallback(L.Callback):
    """EMA with the usual warm-up ``min(decay, (1 + n) / (10 + n))`` over optimiser steps."""

    def __init__(self, decay: float = 0.9999) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow: Optional[List[torch.Tensor]] = None
        self._last_step = 0  # the optimiser step the shadow last took in (set in on_train_start)

    @property
    def state_key(self) -> str:
        return EMA_STATE_KEY

    @staticmethod
    def _params(pl_module: L.LightningModule) -> List[nn.Parameter]:
        return [p for p in pl_module.ema_target.parameters() if p.requires_grad]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        if self.shadow is None:
            self.shadow = [p.detach().float().clone() for p in params]
        else:
            self._match_layout(params)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The shadow already holds the weights of the current step (fresh: the initial copy;
        # resumed: the checkpoint's), so with gradient accumulation the micro-batches before the
        # next optimiser step must not count as an update.
        self._last_step = trainer.global_step

    def _match_layout(self, params: List[nn.Parameter]) -> None:
        """Lay the shadow out like ``params``: a checkpoint's full tensors onto the device, or into
        shards under FSDP2 (whose strategy restores callback states only after ``on_fit_start``)."""
        assert self.shadow is not None
        if len(self.shadow) != len(params):
            raise RuntimeError("EMA state in the checkpoint does not match the model's parameters.")
        if any(is_dtensor(s) != is_dtensor(p) or s.device != p.device for s, p in zip(self.shadow, params)):
            self.shadow = [self._placed(s, p) for s, p in zip(self.shadow, params)]

    @staticmethod
    def _placed(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A checkpoint's full shadow tensor laid out like ``param`` (sharded when it is a DTensor)."""
        if is_dtensor(param):
            # Imported here: torch.distributed can be missing from a torch build; only sharded runs get here.
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
        return full.to(param.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step or self.shadow is None:
            return  # gradient accumulation: only after an optimiser step
        self._last_step = trainer.global_step
        if step_was_skipped(trainer):
            return  # NaNGuard skipped a non-finite step: the weights did not change
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self._match_layout(self._params(pl_module))
        params = [p.detach().float() for p in self._params(pl_module)]
        torch._foreach_lerp_(_local(self.shadow), _local(params), 1.0 - decay)

    def state_dict(self) -> Dict[str, Any]:
        shadow = self.shadow
        if shadow is not None:  # full tensors in the checkpoint, whatever the sharding
            shadow = [s.full_tensor() if is_dtensor(s) else s for s in shadow]
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": shadow}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.decay = state_dict["decay"]
        self.num_updates = state_dict["num_updates"]
        self.shadow = state_dict["shadow"]

    @contextlib.contextmanager
    def applied(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Temporarily load the EMA weights into the target module."""
        if self.shadow is None:
            yield
            return
        params = self._params(pl_module)
        self._match_layout(params)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)


def find_ema(trainer: L.Trainer) -> Optional[EMACallback]:
    """The trainer's EMA callback, if any."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, EMACallback):
            return cb
    return None


def load_ema_into(module: nn.Module, checkpoint: Dict[str, Any]) -> bool:
    """Copy EMA weights from a Lightning checkpoint dict into ``module``; False when it has none."""
    state = checkpoint.get("callbacks", {}).get(EMA_STATE_KEY)
    if not state or state.get("shadow") is None:
        return False
    params = [p for p in module.parameters() if p.requires_grad]
    if len(params) != len(state["shadow"]):
        return False
    with torch.no_grad():
        for p, s in zip(params, state["shadow"]):
            p.copy_(s.to(p.dtype))
    return True
