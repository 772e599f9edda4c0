"""FSDP2 shards as callbacks meet them: DTensor parameters and gradients, and their local parts."""
from __future__ import annotations

import torch
from torch import nn


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded FSDP2 parameter or gradient)."""
    # Imported here: torch.distributed can be missing from a torch build; only sharded runs get here.
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (plain tensors as they are): foreach ops run on these."""
    return t.to_local() if is_dtensor(t) else t


def has_sharded_parameters(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor shard: then every rank must take part in
    its forward passes (sampling for previews or evaluation), since each all-gathers the shards."""
    return any(is_dtensor(p) for p in module.parameters())
