"""Option sections of single systems: ``model.caption`` (captioning), ``model.contrastive``,
``model.prior`` and the text_to_image-only keys of ``model:`` (precomputed shards, the unCLIP decoder)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from mmdiff.config.fields import choice, require, system_field


class CaptionHeadKind(str, enum.Enum):
    ar = "ar"
    masked = "masked"


class CaptionDecoding(str, enum.Enum):
    greedy = "greedy"
    beam = "beam"
    topk = "topk"
    topp = "topp"


@dataclass
class CaptionConfig:
    """Caption head over CLIP image features (``system: captioning``; see docs/captioning.md)."""

    # ar: autoregressive decoder; masked: masked (absorbing-state) diffusion denoiser.
    head: str = choice(CaptionHeadKind.ar)
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    # Caption length in tokens, start and end tokens included (longer captions are cut).
    max_length: int = 32
    # 0: predict over the whole open_clip vocabulary; N > 0: over the N most frequent tokens of the
    # first `vocab_scan_captions` training captions (a much smaller softmax; stored in checkpoints).
    vocab_limit: int = 0
    vocab_scan_captions: int = 100_000
    label_smoothing: float = 0.0
    # Decoding defaults for validation and `mmdiff caption` (each can be overridden per call).
    decoding: str = choice(CaptionDecoding.greedy)
    temperature: float = 1.0
    top_k: int = 10
    top_p: float = 0.9
    beam_size: int = 4
    length_penalty: float = 0.0
    # Masked head: denoising steps of the sampler.
    steps: int = 16
    # Validation: rows of the W&B caption table; CLIP score of generated captions (null: only
    # when model.clip.pretrained is set, i.e. when the CLIP is more than random weights).
    table_rows: int = 16
    clip_score: Optional[bool] = None

    @staticmethod
    def check(c: DictConfig, cfg: DictConfig) -> None:
        require(c.width > 0 and c.heads > 0, "model.caption.width and model.caption.heads must be positive.")
        require(
            c.width % c.heads == 0,
            f"model.caption.width {c.width} must be divisible by model.caption.heads {c.heads}.",
        )
        require(c.layers > 0, f"model.caption.layers must be positive, got {c.layers}.")
        require(c.mlp_ratio > 0, f"model.caption.mlp_ratio must be positive, got {c.mlp_ratio}.")
        require(0.0 <= c.dropout < 1.0, f"model.caption.dropout must be in [0, 1), got {c.dropout}.")
        require(c.max_length >= 3, f"model.caption.max_length must be >= 3, got {c.max_length}.")
        require(
            c.vocab_limit == 0 or c.vocab_limit >= 2,
            f"model.caption.vocab_limit must be 0 (whole vocabulary) or >= 2, got {c.vocab_limit}.",
        )
        require(c.vocab_scan_captions > 0, "model.caption.vocab_scan_captions must be positive.")
        require(
            0.0 <= c.label_smoothing < 1.0,
            f"model.caption.label_smoothing must be in [0, 1), got {c.label_smoothing}.",
        )
        require(c.temperature >= 0, f"model.caption.temperature must be >= 0, got {c.temperature}.")
        require(c.top_k > 0, f"model.caption.top_k must be positive, got {c.top_k}.")
        require(0.0 < c.top_p <= 1.0, f"model.caption.top_p must be in (0, 1], got {c.top_p}.")
        require(c.beam_size > 0, f"model.caption.beam_size must be positive, got {c.beam_size}.")
        require(c.length_penalty >= 0, "model.caption.length_penalty must be >= 0.")
        require(c.steps > 0, f"model.caption.steps must be positive, got {c.steps}.")
        require(c.table_rows >= 0, f"model.caption.table_rows must be >= 0, got {c.table_rows}.")
        require(
            not (c.head == CaptionHeadKind.masked and c.decoding == CaptionDecoding.beam),
            "model.caption.decoding 'beam' needs model.caption.head 'ar'; the masked head decodes "
            "with greedy, topk or topp.",
        )


@dataclass
class ContrastiveConfig:
    """CLIP training on image–caption pairs (``system: contrastive``)."""

    # Zero-shot digit classification prompt at validation ({word} → "seven").
    digit_prompt: str = "a handwritten digit {word}"
    # open_clip ClipLoss options for multi-GPU runs.
    local_loss: bool = False
    gather_with_grad: bool = True

    @staticmethod
    def check(c: DictConfig, cfg: DictConfig) -> None:
        require(
            "{word}" in c.digit_prompt or "{numeral}" in c.digit_prompt,
            f"model.contrastive.digit_prompt must contain {{word}} or {{numeral}}, got '{c.digit_prompt}'.",
        )


@dataclass
class PriorConfig:
    """Transformer denoiser over CLIP image embeddings (``system: prior``; docs/unclip.md)."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # Attend to the CLIP text token states besides the pooled text embedding.
    text_tokens: bool = True
    # Embeddings drawn per prompt at sampling; the one closest to the text embedding is kept
    # (the paper draws 2).
    candidates: int = 1

    @staticmethod
    def check(p: DictConfig, cfg: DictConfig) -> None:
        require(
            p.width > 0 and p.heads > 0 and p.width % p.heads == 0,
            f"model.prior.width {p.width} must be a positive multiple of model.prior.heads {p.heads}.",
        )
        require(p.layers > 0, f"model.prior.layers must be positive, got {p.layers}.")
        require(p.mlp_ratio > 0, f"model.prior.mlp_ratio must be positive, got {p.mlp_ratio}.")
        require(0.0 <= p.dropout < 1.0, f"model.prior.dropout must be in [0, 1), got {p.dropout}.")
        require(p.candidates > 0, f"model.prior.candidates must be positive, got {p.candidates}.")


class PrecomputeLatents(str, enum.Enum):
    """What ``mmdiff precompute`` stores of the VAE posterior (see mmdiff.jobs.precompute)."""

    distribution = "distribution"  # mean + log-variance: a fresh latent is drawn every step
    mean = "mean"
    sample = "sample"  # one posterior draw, fixed for all epochs


class ArrayDtype(str, enum.Enum):
    fp16 = "fp16"
    fp32 = "fp32"


class ImageEmbedConditioning(str, enum.Enum):
    """How a text_to_image U-Net sees a CLIP image embedding (the unCLIP decoder; docs/unclip.md)."""

    none = "none"
    time = "time"  # projected and added to the timestep embedding
    tokens = "tokens"  # projected to model.image_embed_tokens extra cross-attention context tokens
    both = "both"


# The arrays a batch of `mmdiff precompute` shards must carry (mmdiff.jobs.precompute writes them).
PRECOMPUTED_KEYS = ("latent", "context")


@dataclass
class TextToImageOptions:
    """The ``model:`` keys only ``system: text_to_image`` reads (set for another system, an error)."""

    # Train from `mmdiff precompute` shards: batches carry `latent` (+ `latent_logvar`), `context`
    # and `pooled` arrays and the frozen encoders are skipped in the training step.
    precomputed: bool = system_field(False, "text_to_image")
    # What `mmdiff precompute` stores of the VAE posterior, and in which dtype.
    precompute_latents: str = choice(PrecomputeLatents.distribution)
    precompute_dtype: str = choice(ArrayDtype.fp16)
    # text_to_image as an unCLIP decoder: condition the U-Net on the CLIP image embedding of the
    # training image (none | time | tokens | both), zeroed in image_embed_dropout of the rows
    # (for guidance; independent of caption_dropout); `tokens` adds image_embed_tokens tokens.
    image_embed_conditioning: str = choice(ImageEmbedConditioning.none, system="text_to_image")
    image_embed_dropout: float = 0.1
    image_embed_tokens: int = 4
    # SDXL (model.pretrained): share of training rows whose size/crop ids are replaced by the
    # sampling defaults (original = target size, crop (0, 0)), so the model also learns them unconditioned.
    micro_conditioning_dropout: float = 0.0
    # A text_to_image checkpoint whose weights (EMA ones when present) initialise this model;
    # only the image-embedding layers may be new, every other key must match.
    init_from: Optional[str] = system_field(None, "text_to_image")
    # A diffusers Stable Diffusion pipeline folder (1.x, 2.x or XL; model_index.json): sets the VAE
    # and its scaling factor, the U-Net, the text encoder(s) and the noise schedule at once
    # (mmdiff.config.pipeline; keys you set yourself win, architecture keys are refused).
    pretrained: Optional[str] = system_field(None, "text_to_image")

    @staticmethod
    def check(m: DictConfig, cfg: DictConfig) -> None:
        require(
            0.0 <= m.image_embed_dropout <= 1.0,
            f"model.image_embed_dropout must be in [0, 1], got {m.image_embed_dropout}.",
        )
        require(
            0.0 <= m.micro_conditioning_dropout <= 1.0,
            f"model.micro_conditioning_dropout must be in [0, 1], got {m.micro_conditioning_dropout}.",
        )
        require(m.image_embed_tokens > 0, f"model.image_embed_tokens must be positive, got {m.image_embed_tokens}.")
        require(
            m.image_embed_conditioning == ImageEmbedConditioning.none or not m.precomputed,
            "model.image_embed_conditioning needs the training images (the CLIP image embedding is "
            "computed from them); it cannot be combined with model.precomputed.",
        )
        if not m.precomputed:
            return
        d = cfg.data
        require(
            not d.load_images,
            "model.precomputed is true but data.load_images is too; precomputed shards hold no images "
            "(set data.load_images=false, or add the precompute folder's precomputed.yaml to base:).",
        )
        needed = list(PRECOMPUTED_KEYS) + (["pooled"] if m.unet.use_pooled_text else [])
        missing = [k for k in needed if k not in d.array_keys]
        require(
            not missing,
            f"model.precomputed is true but data.array_keys lacks {missing}; use e.g. "
            "data.array_keys=[latent,latent_logvar,context,pooled] (see the precompute folder's "
            "precomputed.yaml).",
        )
