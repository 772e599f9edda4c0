"""Training the text encoder beside the denoiser (``model.clip.freeze: false``; text_to_image, prior).

A system that trains its text encoder trains the text tower only: the vision tower (and CLIP's
``logit_scale``) gets no gradient there, and a trainable parameter without one would make DDP
stop. The text tower is then

* its own AdamW parameter group (``optim.text_encoder_lr``, null = ``optim.lr``) under the same
  warm-up and LR schedule as the denoiser's group (:func:`optimizer_groups`);
* part of the EMA target (:func:`with_text_encoder`), so previews, ``mmdiff.load`` and samples use
  its averaged weights together with the denoiser's;
* in train mode while training and eval mode when sampling (the encoder's ``train``).

The encoder only needs ``frozen``, ``text_parameters(pooled=...)``, ``train_only(params)`` and
``parameters()`` (:class:`mmdiff.models.clip.ClipEncoder`; any other text encoder that has them).
The config refuses the combinations that cannot work (precomputed text states, a low-precision
encoder, FSDP, a text-encoder LR for a frozen encoder): ``ClipConfig.check_training``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Union

import torch
from omegaconf import DictConfig
from torch import nn

log = logging.getLogger(__name__)


def train_text_tower(encoder: Any, pooled: bool) -> bool:
    """Unless ``encoder`` is frozen, train its text tower only (``pooled=False``: without the
    parameters only the pooled embedding depends on, which the system never uses); whether it trains."""
    if encoder.frozen:
        return False
    params = encoder.text_parameters(pooled=pooled)
    encoder.train_only(params)
    log.info("training the text encoder: %d tensors, %.2fM parameters", len(params),
             sum(p.numel() for p in params) / 1e6)
    return True


def with_text_encoder(target: nn.Module, encoder: nn.Module) -> nn.Module:
    """The EMA target ``target`` plus ``encoder`` when it trains (a view, not a registered module);
    ``target`` itself when the encoder is frozen, so frozen runs keep their EMA layout."""
    if getattr(encoder, "frozen", True):
        return target
    return nn.ModuleList([target, encoder])


def optimizer_groups(main: Iterable[torch.nn.Parameter], encoder: nn.Module,
                     optim: DictConfig) -> Union[Iterable[torch.nn.Parameter], List[Dict[str, Any]]]:
    """``main`` as it is for a frozen encoder; else two named AdamW groups, the denoiser's
    (``optim.lr``) and the text encoder's trainable parameters (``optim.text_encoder_lr``)."""
    if getattr(encoder, "frozen", True):
        return main
    text: Dict[str, Any] = {"params": [p for p in encoder.parameters() if p.requires_grad],
                            "name": "text_encoder"}
    if optim.text_encoder_lr is not None:
        text["lr"] = float(optim.text_encoder_lr)
    return [{"params": list(main), "name": "denoiser"}, text]


__all__ = ["optimizer_groups", "train_text_tower", "with_text_encoder"]
