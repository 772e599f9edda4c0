"""Image → text: a caption head on open_clip image features (``system: captioning``).

``model.caption.head`` picks the head (:mod:`mmdiff.models.caption_heads`):

* ``ar`` — autoregressive decoder trained with teacher forcing (next-token cross-entropy);
  captions by greedy, beam, top-k or top-p decoding;
* ``masked`` — bidirectional denoiser trained with the masked-diffusion ELBO of
  :class:`mmdiff.diffusion.MaskedDiffusion`; captions by its ancestral sampler in
  ``model.caption.steps`` steps, which can also complete a partly written caption (the prefix is
  kept) or re-noise and denoise a given one (``strength``).

The CLIP (``model.clip``) is frozen unless ``model.clip.freeze: false``, which fine-tunes its image
tower (the text tower, which gets no gradient here, stays frozen); ``model.clip.pretrained``
may be a ``system: contrastive`` checkpoint. Batches are ``{"image", "caption", "valid", ...}``.

Validation (valid rows only) logs ``val/loss`` and, over the whole validation set (gathered from
all ranks), ``val/bleu4``, ``val/cider_d``, ``val/exact_match``, ``val/digit_accuracy`` (when the
references name digits) and ``val/clip_score`` (when the CLIP is trained, see
``model.caption.clip_score``), all with ``sync_dist=True``; rank 0 logs a W&B table
``val/captions`` of (image, reference, generated) for the first ``model.caption.table_rows`` images.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from mmdiff.config import CaptionHeadKind
from mmdiff.data.decode import CorruptSample, DecodeSpec, decode_sample
from mmdiff.data.shards import expand_shards
from mmdiff.data.tario import ShardError, iter_samples
from mmdiff.diffusion.discrete import MaskedDiffusion
from mmdiff.errors import ConfigError
from mmdiff.eval.caption_metrics import caption_metrics, clip_score
from mmdiff.io.images import to_pil
from mmdiff.models.caption_decoding import Decoded, decode, masked_logits_fn
from mmdiff.models.caption_heads import CaptionTransformer, ImageContext, teacher_forcing_loss
from mmdiff.models.caption_vocab import CaptionVocab
from mmdiff.models.clip import ClipEncoder
from mmdiff.systems.base import System, all_gather_objects, valid_rows
from mmdiff.systems.registry import register_system

log = logging.getLogger(__name__)

Texts = Union[str, Sequence[str], None]


def scan_captions(data_cfg: DictConfig, limit: int) -> Iterator[str]:
    """Up to ``limit`` captions of ``data.train_shards`` in shard order (corrupt samples skipped)."""
    spec = DecodeSpec(caption_key=str(data_cfg.caption_key), load_images=False)
    count = 0
    for url in expand_shards(list(data_cfg.train_shards)):
        try:
            for raw in iter_samples(url):
                try:
                    yield decode_sample(raw, spec).caption
                except CorruptSample:
                    continue
                count += 1
                if count >= limit:
                    return
        except ShardError as err:
            log.warning("vocabulary scan: %s", err)


@register_system("captioning")
class CaptioningSystem(System):
    """Caption head (``ar`` or ``masked``) over a frozen or fine-tuned open_clip image tower."""

    def __init__(self, cfg: DictConfig, caption_vocab: Optional[List[int]] = None) -> None:
        """``caption_vocab``: the head's tokenizer-id shortlist (from a checkpoint); by default it is
        read from the training captions when ``model.caption.vocab_limit`` > 0."""
        super().__init__(cfg)
        c = cfg.model.caption
        self.head_kind = c.head
        self.clip = ClipEncoder.from_config(cfg.model.clip)
        if not self.clip.frozen:  # fine-tune the image tower only: the text tower gets no gradient here
            self.clip.train_only(self.clip.image_parameters())
        tokenizer = self.clip.tokenizer
        if caption_vocab is None and c.vocab_limit > 0:
            if not list(cfg.data.train_shards):
                raise ConfigError(
                    "model.caption.vocab_limit > 0 chooses the vocabulary from data.train_shards, "
                    "which is empty; set it, or model.caption.vocab_limit=0."
                )
            captions = scan_captions(cfg.data, c.vocab_scan_captions)
            caption_vocab = CaptionVocab.shortlist(tokenizer, captions, c.vocab_limit)
            log.info("caption vocabulary: %d tokens from the training captions", len(caption_vocab))
        self.vocab = CaptionVocab(tokenizer, c.max_length, caption_vocab)
        self.head = CaptionTransformer(
            self.vocab.size,
            c.max_length,
            self.clip.embed_dim,
            self.clip.image_token_width,
            width=c.width,
            layers=c.layers,
            heads=c.heads,
            mlp_ratio=c.mlp_ratio,
            dropout=c.dropout,
            causal=self.head_kind == CaptionHeadKind.ar.value,
        )
        self.diffusion = (
            MaskedDiffusion(self.vocab.mask, self.vocab.size)
            if self.head_kind == CaptionHeadKind.masked.value
            else None
        )
        auto = cfg.model.clip.pretrained is not None
        self.use_clip_score = bool(auto if c.clip_score is None else c.clip_score)
        self._val: Dict[str, List[Any]] = {}
        self.save_config(caption_vocab=None if caption_vocab is None else [int(i) for i in caption_vocab])

    @classmethod
    def from_checkpoint_config(cls, cfg: DictConfig, hparams: Dict[str, Any]) -> "CaptioningSystem":
        """Build the architecture only (vocabulary from the checkpoint); weights come from its state dict."""
        cfg.model.clip.pretrained = None
        return cls(cfg, caption_vocab=hparams.get("caption_vocab"))

    @classmethod
    def for_resume(cls, cfg: DictConfig, hparams: Dict[str, Any]) -> "CaptioningSystem":
        """The system a resumed run trains: the checkpoint's vocabulary, not one read again from the
        shards (which may have changed; the head's ids would then name other words). Words of the
        shards outside it are encoded as ``unk``, like any word outside a shortlist."""
        vocab = hparams.get("caption_vocab")
        if vocab is not None:
            log.info("caption vocabulary: %d tokens from the resumed checkpoint", len(vocab))
        return cls(cfg, caption_vocab=vocab)

    # ------------------------------------------------------------------------------ plumbing
    @property
    def ema_target(self) -> torch.nn.Module:
        """The head; the whole system (head + CLIP image tower) when the CLIP is fine-tuned too."""
        return self.head if self.clip.frozen else self

    def image_context(self, images: torch.Tensor) -> ImageContext:
        """Images in [-1, 1] → the head's projected CLIP features."""
        pooled, tokens = self.clip.encode_image(images.to(self.device))
        return self.head.context(pooled, tokens)

    # ------------------------------------------------------------------------------ training
    def _known_start(self, ids: torch.Tensor) -> torch.Tensor:
        known = torch.zeros_like(ids, dtype=torch.bool)
        known[:, 0] = True
        return known

    def _loss(
        self, images: torch.Tensor, captions: List[str], generator: Optional[torch.Generator] = None
    ) -> Dict[str, torch.Tensor]:
        ids = self.vocab.encode(captions).to(self.device)
        ctx = self.image_context(images)
        if self.diffusion is None:
            loss = teacher_forcing_loss(
                self.head, ctx, ids, self.vocab.pad, self.cfg.model.caption.label_smoothing
            )
            return {"loss": loss}
        return self.diffusion.loss(
            lambda x_t, t: self.head(ctx, x_t), ids, known=self._known_start(ids), generator=generator
        )

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._loss(batch["image"], list(batch["caption"]))
        self.log_losses("train", out, batch_size=batch["image"].shape[0])
        return out["loss"]

    # ------------------------------------------------------------------------------ captions
    def _options(self, **options: Any) -> Dict[str, Any]:
        c = self.cfg.model.caption
        defaults = {
            "decoding": c.decoding,
            "temperature": c.temperature,
            "top_k": c.top_k,
            "top_p": c.top_p,
            "beam_size": c.beam_size,
            "length_penalty": c.length_penalty,
            "steps": c.steps,
        }
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"unknown caption option(s): {', '.join(sorted(unknown))}")
        defaults.update({k: v for k, v in options.items() if v is not None})
        decoding = defaults["decoding"]
        if decoding not in ("greedy", "beam", "topk", "topp"):
            raise ValueError(f"unknown decoding '{decoding}'; choose greedy, beam, topk or topp.")
        if decoding == "beam" and self.diffusion is not None:
            raise ValueError("beam decoding is for the 'ar' caption head; the masked head decodes with greedy, topk or topp.")
        if int(defaults["steps"]) <= 0:
            raise ValueError(f"steps must be positive, got {defaults['steps']}.")
        defaults["decoding"] = decoding
        return defaults

    @staticmethod
    def _per_image(texts: Texts, n: int, what: str) -> Optional[List[str]]:
        if texts is None:
            return None
        if isinstance(texts, str):
            return [texts] * n
        texts = list(texts)
        if len(texts) != n:
            raise ValueError(f"{len(texts)} {what} texts for {n} images; give one, or one per image.")
        return texts

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        *,
        seed: int = 0,
        complete: Texts = None,
        denoise: Texts = None,
        strength: float = 0.5,
        **options: Any,
    ) -> Decoded:
        """Head ids (and, for the ``ar`` head, their log-probabilities) for images in [-1, 1].

        ``complete``: a caption start to continue (one for all images, or one per image);
        ``denoise`` (masked head): captions to re-mask with probability ``strength`` and denoise.
        ``options``: ``decoding``, ``temperature``, ``top_k``, ``top_p``, ``beam_size``,
        ``length_penalty``, ``steps`` (masked head) — unset ones come from ``model.caption``.
        """
        opts = self._options(**options)
        n = images.shape[0]
        prefixes = self._per_image(complete, n, "complete")
        noisy = self._per_image(denoise, n, "denoise")
        generator = torch.Generator().manual_seed(int(seed))
        with torch.inference_mode():  # also when the CLIP is trainable (its encoder enables grad)
            ctx = self.image_context(images)
            prefix = self.vocab.encode(prefixes, add_eot=False).to(self.device) if prefixes else None
            if self.diffusion is None:
                if noisy is not None:
                    raise ValueError("denoise is for the 'masked' caption head; the 'ar' head can only complete.")
                return decode(
                    self.head,
                    ctx,
                    self.vocab,
                    decoding=opts["decoding"],
                    prefix=prefix,
                    temperature=float(opts["temperature"]),
                    top_k=int(opts["top_k"]),
                    top_p=float(opts["top_p"]),
                    beam_size=int(opts["beam_size"]),
                    length_penalty=float(opts["length_penalty"]),
                    generator=generator,
                )
            return Decoded(self._sample_masked(ctx, opts, prefix, noisy, strength, generator), torch.full((n,), float("nan")))

    def _sample_masked(
        self,
        ctx: ImageContext,
        opts: Dict[str, Any],
        prefix: Optional[torch.Tensor],
        noisy: Optional[List[str]],
        strength: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
        assert self.diffusion is not None
        n, length = ctx.prefix.shape[0], self.vocab.max_length
        decoding = opts["decoding"]
        temperature = 0.0 if decoding == "greedy" else float(opts["temperature"])
        logits_fn = masked_logits_fn(
            self.head,
            ctx,
            self.vocab,
            top_k=int(opts["top_k"]) if decoding == "topk" else None,
            top_p=float(opts["top_p"]) if decoding == "topp" else None,
        )
        if noisy is not None:
            tokens = self.vocab.encode(noisy).to(self.device)
            known = self._known_start(tokens)
            if prefix is not None:  # keep the given start too
                keep = torch.arange(length, device=self.device) < self.vocab.prefix_length(prefix).unsqueeze(1)
                tokens = torch.where(keep, prefix, tokens)
                known = known | keep
        else:
            strength = 1.0
            if prefix is None:
                prefix = torch.full((n, length), self.vocab.pad, dtype=torch.long, device=self.device)
                prefix[:, 0] = self.vocab.sot
            known = torch.arange(length, device=self.device) < self.vocab.prefix_length(prefix).unsqueeze(1)
            tokens = torch.where(known, prefix, torch.full_like(prefix, self.vocab.mask))
        return self.diffusion.sample(
            logits_fn,
            n,
            length,
            steps=int(opts["steps"]),
            tokens=tokens,
            known=known,
            strength=float(strength),
            generator=generator,
            temperature=temperature,
            device=self.device,
        )

    def caption(self, images: torch.Tensor, **kwargs: Any) -> List[str]:
        """Captions for images B×3×H×W in [-1, 1] (see :meth:`generate` for the options)."""
        return self.vocab.decode(self.generate(images, **kwargs).ids)

    # ------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"pred": [], "ref": [], "clip": [], "table": []}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        keep = valid_rows(batch)
        if not keep:
            return
        images = batch["image"][keep]
        refs = [batch["caption"][i] for i in keep]
        seed = self.cfg.seed * 100003 + batch_idx
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = self._loss(images, refs, generator=gen)
        self.log_losses("val", {"loss": out["loss"]}, batch_size=len(keep))
        preds = self.caption(images, seed=seed)
        self._val["pred"] += preds
        self._val["ref"] += refs
        if self.use_clip_score:
            pooled, _ = self.clip.encode_image(images)
            _, text = self.clip.encode_text(self.clip.tokenize(preds).to(self.device))
            self._val["clip"] += clip_score(pooled, text).cpu().tolist()
        room = self.cfg.model.caption.table_rows - len(self._val["table"])
        if room > 0 and self.global_rank == 0:
            for image, ref, pred in list(zip(images[:room].cpu(), refs, preds)):
                self._val["table"].append((image, ref, pred))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        # Every rank joins the gather, even one without valid rows.
        parts = all_gather_objects(self, (self._val["pred"], self._val["ref"], self._val["clip"]))
        preds = [p for part in parts for p in part[0]]
        if not preds:
            self._val = {}
            return
        refs = [r for part in parts for r in part[1]]
        scores = [s for part in parts for s in part[2]]
        metrics = caption_metrics(preds, refs)
        if scores:
            metrics["clip_score"] = sum(scores) / len(scores)
        # Every rank computed the same corpus numbers from the gathered captions.
        self.log_losses("val", {name: float(value) for name, value in metrics.items()})
        log.info("validation: %s", ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if self.global_rank == 0 and self._val["table"]:
            self._log_table(self._val["table"])
        self._val = {}

    def _log_table(self, rows: List[Any]) -> None:
        loggers = [lg for lg in (self.loggers or []) if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        # Imported here: wandb takes about a second to import; only runs that log to W&B pay it.
        import wandb

        pictures = to_pil(torch.stack([r[0] for r in rows]))
        data = [[wandb.Image(p), ref, pred] for p, (_, ref, pred) in zip(pictures, rows)]
        for logger in loggers:
            logger.log_table(
                key="val/captions", columns=["image", "reference", "generated"], data=data,
                step=self.global_step,
            )


__all__ = ["CaptioningSystem", "scan_captions"]
