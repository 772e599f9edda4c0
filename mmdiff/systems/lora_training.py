"""``model.lora`` on the text_to_image system: which weights train, which a checkpoint holds.

With adapters (:mod:`mmdiff.models.lora`) the U-Net's (and, with ``model.lora.text_encoder``, the
text tower's) base weights are frozen; only the adapters train, and the EMA callback follows them
alone (it averages the ``ema_target``'s parameters that require a gradient). A checkpoint leaves
out every frozen weight the config can read again — the U-Net's always (``model.pretrained``,
``model.init_from`` or ``model.unet.pretrained`` holds it), the text encoder's and the VAE's when
a file in the config holds them — and keeps the adapters, buffers such as ``latent_scale``, and
any other trained or unrecoverable weight. Loading rebuilds the base from the config and then
needs every adapter key (:func:`rebuilt_keys` lists the keys a checkpoint may lack).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Set

from omegaconf import DictConfig

from mmdiff.models.lora import add_text_lora, add_unet_lora, is_lora_key, parameter_counts

log = logging.getLogger(__name__)


def lora_section(cfg: DictConfig) -> Optional[DictConfig]:
    """``model.lora`` when adapters are on (rank > 0), else None."""
    section = cfg.model.get("lora")
    return section if section is not None and int(section.rank) > 0 else None


def _rebuilt_prefixes(cfg: DictConfig) -> tuple:
    """The submodules whose frozen weights the config reads again from a file."""
    m = cfg.model
    whole = m.get("pretrained") is not None or m.init_from is not None  # a pipeline / checkpoint: all parts
    prefixes = ["unet."]
    if whole or m.clip.pretrained is not None:
        prefixes.append("clip.")
    if whole or m.vae.pretrained is not None:
        prefixes.append("vae.")
    return tuple(prefixes)


def add_adapters(system: Any, lora: DictConfig) -> None:
    """Add ``model.lora``'s adapters to ``system.unet`` (and the text tower), freezing their base."""
    common = dict(rank=int(lora.rank), alpha=lora.alpha, dropout=float(lora.dropout), init=str(lora.init))
    add_unet_lora(system.unet, targets=list(lora.unet_targets), **common)
    cond_proj = getattr(system.unet.time_embedding, "cond_proj", None)
    if cond_proj is not None:  # the unCLIP decoder's new image-embedding input trains in full
        cond_proj.requires_grad_(True)
    if lora.text_encoder:
        add_text_lora(system.clip._text, targets=list(lora.text_encoder_targets), **common)
        system.clip.frozen = False  # gradients reach the adapters; the base weights stay frozen
    # Checkpoints leave the base out, so Lightning must not insist on every key: on_load_checkpoint
    # checks them instead (check_checkpoint).
    system.strict_loading = False
    counts = parameter_counts(system)
    log.info("LoRA rank %d: %d adapter parameters train, %d base parameters frozen",
             int(lora.rank), counts["adapter"], counts["base"])


def rebuilt_keys(system: Any) -> Set[str]:
    """State-dict keys a LoRA checkpoint leaves out: frozen weights the config can read again."""
    prefixes = _rebuilt_prefixes(system.cfg)
    trainable = {name for name, p in system.named_parameters() if p.requires_grad}
    return {k for k in system.state_dict() if k.startswith(prefixes) and not is_lora_key(k) and k not in trainable}


def filter_checkpoint(system: Any, checkpoint: Dict[str, Any]) -> None:
    """Drop :func:`rebuilt_keys` from a checkpoint's state dict (in place)."""
    state = checkpoint.get("state_dict")
    if not state:
        return
    dropped = rebuilt_keys(system)
    for key in [k for k in state if k in dropped]:
        del state[key]
