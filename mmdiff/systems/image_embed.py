"""The text_to_image system as an unCLIP decoder: image-embedding conditioning and ``model.init_from``.

``model.image_embed_conditioning`` (none | time | tokens | both) adds the CLIP image embedding of
the training image (:func:`~mmdiff.models.prior_net.scaled_embedding`) to the U-Net's time embedding
(``time_embedding.cond_proj``, see :mod:`mmdiff.models.unet`) and/or as
``model.image_embed_tokens`` extra context tokens (:class:`~mmdiff.models.prior_net.ImageEmbedTokens`).
Rows where it is dropped (``model.image_embed_dropout``) get the zero vector, which is also the
unconditional branch of guidance and what text-only sampling passes.

``model.init_from`` fine-tunes such a decoder from a text-only text_to_image checkpoint: every
weight must match by name and shape except the image-embedding layers (:data:`NEW_KEYS`), which
keep their fresh initialisation; the checkpoint's EMA weights are used when it has them (its
text encoder's too, when it trained one: ``model.clip.freeze: false``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from mmdiff.io.weights import load_strict, safe_torch_load
from mmdiff.errors import CheckpointError
from mmdiff.models.unet import check_projection_layout

log = logging.getLogger(__name__)

# The state-dict keys an image-embedding decoder has beyond a text-only text_to_image system.
NEW_KEYS = ("unet.time_embedding.cond_proj.weight", "image_tokens.*")
# Frozen parts that a checkpoint given as model.init_from must not silently replace.
_FROZEN = {"clip.": "model.clip.pretrained", "vae.": "model.vae.pretrained"}


def mode_of(cfg: Any) -> str:
    """``model.image_embed_conditioning`` as a plain string."""
    return cfg.model.image_embed_conditioning


def drop_mask(n: int, p: float) -> Optional[torch.Tensor]:
    """Rows whose image embedding is zeroed (for guidance); None without dropout."""
    return torch.rand(n) < p if p > 0 else None


def zero_rows(embedding: torch.Tensor, drop: Optional[torch.Tensor]) -> torch.Tensor:
    """``embedding`` with the rows where ``drop`` is True set to zero."""
    if drop is None:
        return embedding
    return embedding.masked_fill(drop.to(embedding.device).view(-1, 1), 0.0)


def _differs(system: torch.nn.Module, state: dict, prefix: str, trained: Sequence[str] = ()) -> List[str]:
    """Keys under ``prefix`` whose weights in ``state`` differ from ``system``'s, except ``trained`` ones."""
    own = system.state_dict()
    skip = set(trained)
    return [k for k, v in state.items() if k.startswith(prefix) and k in own and k not in skip
            and not torch.equal(own[k].cpu(), v.cpu())]


def _trained_text_keys(system: Any, checkpoint: dict) -> List[str]:
    """The text-tower keys of a source checkpoint that trained its text encoder
    (``model.clip.freeze: false``): those differ from ``model.clip.pretrained`` by design."""
    clip_cfg = checkpoint.get("hyper_parameters", {}).get("config", {}).get("model", {}).get("clip", {})
    if clip_cfg.get("freeze", True):
        return []
    return [f"clip.model.{name}" for name, _ in system.clip.named_text_parameters()]


def init_from_checkpoint(system: torch.nn.Module, path: str | Path) -> None:
    """Load a text_to_image checkpoint's weights into ``system`` (see the module docstring).

    The CLIP and VAE weights of the checkpoint must equal those ``model.clip/vae.pretrained``
    loaded (when set): a decoder silently given another CLIP than its prior is refused.
    """
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"model.init_from '{path}' is not an mmdiff training checkpoint.")
    system_name = checkpoint.get("hyper_parameters", {}).get("config", {}).get("system")
    if system_name != "text_to_image":
        raise CheckpointError(
            f"model.init_from '{path}' is a '{system_name}' checkpoint; it must be a text_to_image one."
        )
    state = dict(checkpoint["state_dict"])
    trained = _trained_text_keys(system, checkpoint)
    for prefix, key in _FROZEN.items():
        if getattr(system.cfg.model, key.split(".")[1]).pretrained is not None:
            bad = _differs(system, state, prefix, trained)
            if bad:
                raise CheckpointError(
                    f"model.init_from '{path}' holds other {prefix[:-1].upper()} weights than {key} "
                    f"({bad[0]} differs); point both at the same model."
                )
    check_projection_layout(state, bool(system.cfg.model.unet.use_linear_projection),
                            f"model.init_from '{path}'")
    load_strict(system, state, f"model.init_from ('{path}')", ignore_keys=NEW_KEYS)
    ema = checkpoint.get("callbacks", {}).get("EMA", {})
    shadow = ema.get("shadow") if isinstance(ema, dict) else None
    if shadow:
        params = [p for name, p in system.unet.named_parameters()
                  if p.requires_grad and f"unet.{name}" not in NEW_KEYS]
        if trained:  # the source's EMA averaged its trained text tower too, after the U-Net
            source = checkpoint["hyper_parameters"]["config"]["model"]
            params += system.clip.text_parameters(pooled=bool(source.get("unet", {}).get("use_pooled_text", False)))
        if len(params) != len(shadow):
            raise CheckpointError(
                f"model.init_from '{path}' has {len(shadow)} EMA tensors for {len(params)} U-Net "
                "(and text encoder) parameters; it was written by another architecture."
            )
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.dtype))
    log.info("initialised from %s (%s EMA weights; new: %s)", path, "with" if shadow else "without",
             ", ".join(NEW_KEYS))


__all__ = ["NEW_KEYS", "init_from_checkpoint", "mode_of", "drop_mask", "zero_rows"]
