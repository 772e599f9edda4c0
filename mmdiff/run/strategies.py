"""Distributed strategies from the config: ``trainer.strategy: auto | ddp | fsdp | ...``.

``build_strategy(cfg)`` returns what ``lightning.Trainer(strategy=...)`` takes:

* ``auto``, ``ddp``, ``ddp_spawn``, ``ddp_find_unused_parameters_true``: Lightning's own, by name.
  DDP replicates the whole system (frozen VAE and text encoder included) and all-reduces the
  gradients of the trainable parameters (the U-Net).
* ``fsdp``: :class:`FSDP2Strategy` — Lightning's ``ModelParallelStrategy`` with torch's
  ``fully_shard`` (FSDP2) applied to the *trainable* submodules only (:func:`shard_trainable`):
  each block of the U-Net is its own FSDP unit, then the U-Net itself; frozen modules (VAE, CLIP)
  stay ordinary replicated modules in the precision the config gives them
  (``model.vae.precision``). The same path on CPU (gloo) and GPU (NCCL): Lightning's
  ``strategy="fsdp"`` (FSDP1) refuses a CPU accelerator, and one code path is the one tested.
  ``trainer.fsdp_sharding``: ``full`` shards parameters, gradients and optimiser state over all
  ranks; ``hybrid`` shards within a node and replicates across nodes (HSDP: a
  ``(nodes, ranks per node)`` mesh), trading memory for less inter-node traffic.

Checkpoints under ``fsdp`` are single ``.ckpt`` files with the full (gathered) weights and
optimiser state, like every other strategy's, so ``--resume``, ``mmdiff sample`` and ``mmdiff.load``
work unchanged; the gather costs rank 0 the memory of one full copy.

A system does not need ``configure_model``: :class:`FSDP2Strategy` shards its trainable
submodules itself. A system that wants to choose may define::

    def configure_model(self) -> None:
        shard_trainable(self)        # from mmdiff.run.strategies; a no-op unless the strategy is fsdp
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, List, Optional, Union

from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from mmdiff.config.trainer import STRATEGY_NAMES

log = logging.getLogger(__name__)

# -------------------------------------------------------------------------------- sharding
def _is_sharded(module: nn.Module) -> bool:
    # Imported here: torch.distributed can be missing from a torch build; only FSDP runs get here.
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The elements of the outermost ``nn.ModuleList``s inside ``module`` (U-Net down/up blocks)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from (m for m in child if any(True for _ in m.parameters()))
        else:
            yield from _blocks(child)


def _to_contiguous(module: nn.Module) -> bool:
    """Make ``module``'s parameters contiguous; whether any was not (e.g. channels_last weights,
    which ``fully_shard`` cannot shard)."""
    changed = False
    for p in module.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
            changed = True
    return changed


def trainable_children(module: nn.Module) -> List[str]:
    """Names of the direct submodules of ``module`` that hold a parameter requiring grad."""
    return [name for name, child in module.named_children()
            if any(p.requires_grad for p in child.parameters())]


def shard_trainable(
    module: nn.Module,
    mesh: Optional[Any] = None,
    reshard_after_forward: bool = True,
    mp_policy: Optional[Any] = None,
) -> List[str]:
    """Apply FSDP2 ``fully_shard`` to the trainable submodules of ``module``; return their names.

    Each trainable direct child (for text-to-image: ``unet``) gets one FSDP unit per element of
    its outermost ``ModuleList``s (the U-Net's down/up blocks), then one for itself; children with
    no trainable parameter (frozen ``vae``, ``clip``) are left alone — replicated, unsharded, in
    their own dtype. ``mesh`` defaults to the FSDP mesh of the trainer's :class:`FSDP2Strategy`;
    without one (any other strategy) nothing happens. Calling it twice is harmless.
    """
    # Imported here: torch.distributed can be missing from a torch build; only FSDP runs get here.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        trainer = getattr(module, "_trainer", None)
        strategy = getattr(trainer, "strategy", None) if trainer is not None else None
        mesh = getattr(strategy, "fsdp_mesh", None)
        if mesh is None:
            return []
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    sharded = []
    for name in trainable_children(module):
        child = getattr(module, name)
        if _is_sharded(child):
            continue
        if _to_contiguous(child):
            log.info("FSDP2: %s's channels_last weights made contiguous (fully_shard refuses them); "
                     "its inputs stay channels_last", name)
        # fully_shard refuses 0-d parameters (open_clip's logit_scale, once a CLIP holds adapters);
        # frozen ones need no gradient reduction, so they stay ordinary replicated tensors.
        ignored = {p for p in child.parameters() if p.ndim == 0 and not p.requires_grad} or None
        blocks = list(_blocks(child))
        for block in blocks:
            if not _is_sharded(block):
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        # The child itself becomes a unit only when it trains parameters outside its blocks: a CLIP
        # whose adapters all sit in its blocks is called through encode_text, not forward, so FSDP's
        # forward hooks on it would never gather its (frozen) embeddings.
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        if not blocks or any(p.requires_grad and id(p) not in in_blocks for p in child.parameters()):
            fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                        ignored_params=ignored)
        sharded.append(name)
    if sharded:
        log.info("FSDP2: sharded %s over a %s mesh", ", ".join(sharded), tuple(mesh.shape))
    return sharded


# -------------------------------------------------------------------------------- strategy
class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` doing FSDP2 data parallelism only (no tensor parallelism).

    ``sharding="full"``: one mesh dimension over all ranks. ``"hybrid"``: a 2-D
    ``("replicate", "shard")`` mesh of (nodes, ranks per node). ``fsdp_mesh`` is that mesh (set
    once processes exist); the LightningModule's ``device_mesh`` is Lightning's own
    ``("data_parallel", "tensor_parallel")`` mesh of shape (world, 1).
    """

    def __init__(self, sharding: str = "full", reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = False, **kwargs: Any) -> None:
        if sharding not in ("full", "hybrid"):
            raise ValueError(f"sharding must be 'full' or 'hybrid', got {sharding!r}")
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.sharding = sharding
        self.reshard_after_forward = reshard_after_forward
        self.fsdp_mesh: Optional[Any] = None

    def setup_environment(self) -> None:
        # Imported here: torch.distributed can be missing from a torch build; only FSDP runs get here.
        from torch.distributed.device_mesh import init_device_mesh

        world = self.num_nodes * self.num_processes
        self._data_parallel_size, self._tensor_parallel_size = world, 1
        super().setup_environment()
        device = self.root_device.type
        if self.sharding == "hybrid":
            shape, names = (self.num_nodes, self.num_processes), ("replicate", "shard")
        else:
            shape, names = (world,), ("shard",)
        self.fsdp_mesh = init_device_mesh(device, shape, mesh_dim_names=names)

    def setup(self, trainer: Any) -> None:
        """ModelParallelStrategy.setup, with the trainable submodules sharded here when the
        system's ``configure_model`` did not (Lightning itself insists on ``configure_model``)."""
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        shard_trainable(self.lightning_module, self.fsdp_mesh, self.reshard_after_forward)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)


def build_strategy(cfg: Any) -> Union[str, Strategy]:
    """What ``Trainer(strategy=...)`` gets for ``cfg.trainer`` (see the module docstring)."""
    t = cfg.trainer
    name = t.strategy
    if name == "fsdp":
        sharding = t.fsdp_sharding
        return FSDP2Strategy(sharding=sharding)
    return name


__all__ = ["STRATEGY_NAMES", "FSDP2Strategy", "build_strategy", "shard_trainable",
           "trainable_children"]
