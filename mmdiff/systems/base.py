"""The contract every system meets: :class:`System`, the LightningModule base of all of them.

A system is registered by name (``@register_system("name")`` on the class and one line in
:data:`mmdiff.systems.registry._BUILTIN`) and built from the experiment config alone. The run
machinery, the Python API and the callbacks rely on this class only:

* ``system_name`` — the ``system:`` key it is registered as;
* ``System(cfg)`` builds it, and :meth:`System.save_config` stores the config (plus whatever else
  rebuilding needs) as the checkpoint's hyper-parameters;
* :meth:`System.for_resume` builds it for a run that resumes from a checkpoint (default: as new);
* :meth:`System.from_checkpoint_config` rebuilds the architecture from a checkpoint's config
  without reading any pretrained weights (they come from the checkpoint's state dict);
* :attr:`System.ema_target` — the module an EMA of the weights follows (None: no EMA);
* :meth:`System.preview_images` — images for the preview callback (none by default);
* :meth:`System.configure_optimizers` — AdamW + LR schedule over :meth:`System.optimizer_parameters`;
* :meth:`System.log_losses` — how losses and metrics are logged;
* :meth:`System.optional_checkpoint_keys`, :meth:`System.weights_mismatch`, :meth:`System.load_weights` —
  which weights a checkpoint may leave out (default none: every key must match) and the strict
  check and load every reader of a checkpoint uses.

:func:`valid_rows` and :func:`all_gather_objects` are the validation helpers every system shares.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional, Set

import lightning as L
import torch
from omegaconf import DictConfig

from mmdiff.config import to_container
from mmdiff.errors import CheckpointError
from mmdiff.io.weights import describe_mismatch
from mmdiff.systems.optim import configure_adamw, fused_adamw_setting


def valid_rows(batch: Mapping[str, Any]) -> List[int]:
    """Indices of the real (not padding-placeholder) rows of a validation batch."""
    n = len(batch["caption"])
    valid = batch.get("valid")
    if valid is None:
        return list(range(n))
    return [i for i, ok in enumerate(valid.tolist()) if ok]


def all_gather_objects(module: L.LightningModule, obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` (just ``[obj]`` outside distributed runs)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: List[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


class System(L.LightningModule):
    """Base of every mmdiff LightningModule (see the module docstring for the contract)."""

    system_name: ClassVar[str] = ""  # set by mmdiff.systems.registry.register_system

    def __init__(self, cfg: Optional[DictConfig]) -> None:
        super().__init__()
        self.cfg = cfg

    def save_config(self, **extra: Any) -> None:
        """Store the config (as plain containers) and ``extra`` as the checkpoint's hyper-parameters."""
        self.save_hyperparameters({"config": to_container(self.cfg), **extra})

    @classmethod
    def from_checkpoint_config(cls, cfg: DictConfig, hparams: Mapping[str, Any]) -> "System":
        """The architecture a checkpoint with this config and these hyper-parameters holds.

        Systems that read pretrained weights in ``__init__`` switch that off here: the weights come
        from the checkpoint's state dict.
        """
        return cls(cfg)

    @classmethod
    def for_resume(cls, cfg: DictConfig, hparams: Mapping[str, Any]) -> "System":
        """The system a run resuming from a checkpoint with these hyper-parameters trains.

        Systems that choose state from the data at the first start (the captioning vocabulary)
        take it from the checkpoint here instead, so a resume never re-derives it from new shards.
        """
        return cls(cfg)

    # ------------------------------------------------------------------------------ checkpoint weights
    def optional_checkpoint_keys(self) -> Set[str]:
        """State-dict keys a checkpoint of this system may leave out because building the system
        from its config reads them again (frozen base weights under LoRA); none by default."""
        return set()

    def weights_mismatch(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        """How ``state_dict`` fails to fit this system (None: it fits); only
        :meth:`optional_checkpoint_keys` may be missing."""
        optional = self.optional_checkpoint_keys()
        if optional:
            own = self.state_dict()
            state_dict = {**{k: own[k] for k in optional if k not in state_dict}, **state_dict}
        return describe_mismatch(self, state_dict)

    def load_weights(self, state_dict: Mapping[str, Any], what: str) -> None:
        """Load a checkpoint's state dict strictly (see :meth:`weights_mismatch`); a mismatch is a
        one-line :class:`CheckpointError` naming ``what``."""
        problem = self.weights_mismatch(state_dict)
        if problem:
            raise CheckpointError(f"{what} weights do not fit the model: {problem}; check that the architecture "
                                  "in the config matches the weights file.")
        self.load_state_dict(dict(state_dict), strict=not self.optional_checkpoint_keys())

    @property
    def ema_target(self) -> Optional[torch.nn.Module]:
        """The module an exponential moving average of the weights follows; None: no EMA."""
        return None

    def preview_images(self) -> Dict[str, Any]:
        """``{name: images B×3×H×W in [-1, 1], or (images, nrow), or (images, nrow, captions)}``
        for the preview callback; ``captions`` (one string per image, e.g. its prompt) gives W&B
        one captioned image per distinct caption and a Table beside the grid."""
        return {}

    # ------------------------------------------------------------------------------ optimisation
    def optimizer_parameters(self) -> Iterator[torch.nn.Parameter]:
        """What the default optimiser trains: the EMA target, else the whole system (parameters
        that need no gradient are left out by :func:`configure_adamw`)."""
        target = self.ema_target
        return (self if target is None else target).parameters()

    def configure_optimizers(self) -> Dict[str, Any]:
        """AdamW over :meth:`optimizer_parameters` with ``optim:``'s warm-up and LR schedule."""
        return configure_adamw(self.optimizer_parameters(), self.cfg.optim, self.cfg.trainer.max_steps,
                               fused=fused_adamw_setting(self.cfg.trainer))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Clip also for a fused AdamW where no GradScaler is in use.

        Lightning's mixed-precision plugin refuses to clip for any optimiser that unscales inside
        its step (fused AdamW), also under bf16 autocast, where there is no scaler and the gradients
        are already true-scale; every ``bf16-mixed`` run with the default fused AdamW and
        ``trainer.gradient_clip_val`` would stop at its first step.
        """
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and getattr(plugin, "scaler", False) is None:
            if gradient_clip_algorithm == "value":
                plugin.clip_grad_by_value(optimizer, gradient_clip_val)
            else:
                plugin.clip_grad_by_norm(optimizer, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------------------ logging
    def log_losses(self, stage: str, values: Mapping[str, Any], batch_size: Optional[int] = None,
                   prog_bar: Optional[Iterable[str]] = None) -> None:
        """Log each of ``values`` as ``STAGE/NAME``.

        Outside training they are averaged over ranks (``sync_dist``). ``prog_bar``: the names shown
        in the progress bar (default: ``loss`` in training, none otherwise).
        """
        shown = set(prog_bar if prog_bar is not None else (("loss",) if stage == "train" else ()))
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in shown, batch_size=batch_size,
                     sync_dist=stage != "train")


__all__ = ["System", "all_gather_objects", "valid_rows"]
