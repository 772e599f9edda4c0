"""Contrastive training of the open_clip model itself on image–caption shards (``system: contrastive``).

The loss is open_clip's own ``ClipLoss`` (symmetric InfoNCE over the batch with the learned
temperature ``logit_scale``, clamped to ≤ 100 after every step as open_clip's trainer does; across
GPUs the features are gathered as ``model.contrastive.local_loss`` / ``gather_with_grad`` say).

Validation embeds every valid image and caption of the validation shards and logs

* ``val/loss`` — ClipLoss per validation batch;
* ``val/recall@1_i2t``, ``val/recall@1_t2i`` (and ``@5``) — zero-shot retrieval over the whole
  validation set, duplicate captions counted as one text (:mod:`mmdiff.eval.retrieval`);
* ``val/zero_shot_digits`` — zero-shot classification of the images whose caption names a digit
  by the nearest of the ten prompts ``model.contrastive.digit_prompt`` ("a handwritten digit
  {word}"); skipped when no caption names a digit.

The checkpoint works as the CLIP of the other systems: ``model.clip.pretrained:
runs/demo/clip/checkpoints/last.ckpt`` (its ``clip.model.*`` weights are picked out, see
:func:`load_clip_state`). ``model.clip.freeze`` is ignored here — this system trains the CLIP.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from mmdiff.config import to_container
from mmdiff.data.digits import digit_from_caption
from mmdiff.eval.retrieval import digit_prompts, group_ids, recall_at_k, zero_shot_accuracy
from mmdiff.models.clip import ClipEncoder
from mmdiff.systems.common import FusedAdamWClipping, fused_adamw_setting, lr_lambda, use_fused_adamw
from mmdiff.systems.registry import register_system

log = logging.getLogger(__name__)

CLIP_PREFIX = "clip.model."
MAX_LOGIT_SCALE = math.log(100.0)


def load_clip_state(path: str | Path) -> Dict[str, torch.Tensor]:
    """The open_clip state dict inside an mmdiff checkpoint (keys ``clip.model.*``, prefix removed).

    ``ClipEncoder`` does the same when ``model.clip.pretrained`` names such a ``.ckpt`` (custom
    architectures); this is the notebook form, e.g. to export the CLIP as safetensors.
    """
    from mmdiff.io.weights import load_state_dict_file
    from mmdiff.errors import CheckpointError

    state = load_state_dict_file(path)
    clip = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    if not clip:
        raise CheckpointError(f"'{path}' holds no CLIP weights (no '{CLIP_PREFIX}*' keys).")
    return clip


def valid_rows(batch: Dict[str, Any]) -> List[int]:
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


@register_system("contrastive")
class ContrastiveSystem(FusedAdamWClipping, L.LightningModule):
    """Trains ``model.clip`` with open_clip's ClipLoss; validates zero-shot retrieval and digits."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        clip_cfg = copy.deepcopy(cfg.model.clip)
        clip_cfg.freeze = False
        self.clip = ClipEncoder.from_config(clip_cfg)
        self.loss_fn: Optional[torch.nn.Module] = None
        self._val: Dict[str, List[Any]] = {}
        self.save_hyperparameters({"config": to_container(cfg)})

    @classmethod
    def from_checkpoint_config(cls, cfg: DictConfig, hparams: Dict[str, Any]) -> "ContrastiveSystem":
        """Build the architecture only; weights come from the checkpoint's state dict."""
        cfg.model.clip.pretrained = None
        return cls(cfg)

    # ------------------------------------------------------------------------------ embeddings
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.model.logit_scale

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → L2-normalised CLIP image embeddings B×E."""
        pooled, _ = self.clip.encode_image(images.to(self.device))
        return F.normalize(pooled, dim=-1)

    def embed_texts(self, texts: List[str]) -> torch.Tensor:
        """Captions → L2-normalised CLIP text embeddings B×E."""
        _, pooled = self.clip.encode_text(self.clip.tokenize(list(texts)).to(self.device))
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def classify_digits(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot digit per image (B,) with ``model.contrastive.digit_prompt``."""
        classes = self.embed_texts(digit_prompts(self.cfg.model.contrastive.digit_prompt))
        return (self.embed_images(images) @ classes.T).argmax(dim=1)

    # ------------------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        from open_clip.loss import ClipLoss

        c = self.cfg.model.contrastive
        trainer = self._trainer
        self.loss_fn = ClipLoss(
            local_loss=c.local_loss,
            gather_with_grad=c.gather_with_grad,
            cache_labels=True,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )

    def _loss(self, images: torch.Tensor, captions: List[str]) -> torch.Tensor:
        if self.loss_fn is None:
            self.setup("fit")
        return self.loss_fn(self.embed_images(images), self.embed_texts(captions), self.logit_scale.exp())

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch["image"], list(batch["caption"]))
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", self.logit_scale.exp().detach(), batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_optimizers(self) -> Dict[str, Any]:
        """AdamW without weight decay on gains, biases, embeddings and the temperature (as open_clip)."""
        o = self.cfg.optim
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
            exclude = exclude or "logit_scale" in name or "embedding" in name
            (no_decay if exclude else decay).append(p)
        extra = {"fused": True} if use_fused_adamw(decay + no_decay, fused_adamw_setting(self.cfg.trainer)) else {}
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            **extra,
        )
        schedule = o.schedule
        max_steps = self.cfg.trainer.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_lambda(step, o.warmup_steps, max_steps, schedule, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"image": [], "text": [], "caption": []}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        keep = valid_rows(batch)
        if not keep:
            return
        images = batch["image"][keep]
        captions = [batch["caption"][i] for i in keep]
        image_emb, text_emb = self.embed_images(images), self.embed_texts(captions)
        loss = F.cross_entropy(self.logit_scale.exp() * image_emb @ text_emb.T, torch.arange(len(keep), device=self.device))
        loss = (loss + F.cross_entropy(self.logit_scale.exp() * text_emb @ image_emb.T, torch.arange(len(keep), device=self.device))) / 2
        self.log("val/loss", loss, sync_dist=True, batch_size=len(keep))
        self._val["image"].append(image_emb.float().cpu())
        self._val["text"].append(text_emb.float().cpu())
        self._val["caption"] += captions

    def on_validation_epoch_end(self) -> None:
        val, self._val = self._val, {}
        if not val:
            return
        local = (val["image"], val["text"], val["caption"])
        parts = all_gather_objects(self, local)  # every rank joins, even one without valid rows
        captions = [c for p in parts for c in p[2]]
        if not captions:
            return
        image_emb = torch.cat([t for p in parts for t in p[0]])
        text_emb = torch.cat([t for p in parts for t in p[1]])
        metrics = retrieval_metrics(image_emb, text_emb, captions)
        labels = [digit_from_caption(c) for c in captions]
        named = [i for i, d in enumerate(labels) if d is not None]
        if named:
            with torch.no_grad():
                classes = self.embed_texts(digit_prompts(self.cfg.model.contrastive.digit_prompt)).float().cpu()
            metrics["zero_shot_digits"] = zero_shot_accuracy(
                image_emb[named], classes, torch.tensor([labels[i] for i in named])
            )
        for name, value in metrics.items():
            # Every rank computed the same numbers from the gathered embeddings.
            self.log(f"val/{name}", value, sync_dist=True)
        log.info("validation: %s", ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: List[str]) -> Dict[str, float]:
    """recall@1 and @5, both directions, with duplicate captions grouped."""
    groups = group_ids(captions)
    out: Dict[str, float] = {}
    for k in (1, 5):
        i2t, t2i = recall_at_k(image_emb, text_emb, k=k, groups=groups)
        out[f"recall@{k}_i2t"], out[f"recall@{k}_t2i"] = i2t, t2i
    return out


__all__ = ["ContrastiveSystem", "load_clip_state", "retrieval_metrics", "all_gather_objects", "valid_rows"]
