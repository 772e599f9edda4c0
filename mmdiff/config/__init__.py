"""Typed experiment configs: YAML + ``base:`` files + ``key=value`` overrides, checked early.

Every experiment is one YAML file validated against :class:`ExperimentConfig` (OmegaConf
structured configs). Unknown keys and wrong types fail before any model is built or any data is
read, with one line that names the key, the file it came from and the closest valid key.
"""
from __future__ import annotations

import copy
import difflib
import enum
import logging
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mmdiff.config.guard import check_no_secrets, check_resolvers
from mmdiff.errors import ConfigError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- enums
class Crop(str, enum.Enum):
    center = "center"
    random = "random"


class LoggerKind(str, enum.Enum):
    wandb = "wandb"
    csv = "csv"
    none = "none"


class WandbMode(str, enum.Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class LRSchedule(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"


class BetaSchedule(str, enum.Enum):
    linear = "linear"
    scaled_linear = "scaled_linear"
    cosine = "cosine"
    sigmoid = "sigmoid"
    custom = "custom"


class PredictionType(str, enum.Enum):
    epsilon = "epsilon"
    v_prediction = "v_prediction"
    sample = "sample"


class LossWeighting(str, enum.Enum):
    uniform = "uniform"
    min_snr = "min_snr"


class TimestepSampling(str, enum.Enum):
    uniform = "uniform"
    low_discrepancy = "low_discrepancy"


class VarianceType(str, enum.Enum):
    fixed_small = "fixed_small"
    fixed_large = "fixed_large"
    learned_range = "learned_range"


# The keys of mmdiff.diffusion.SAMPLERS, spelled out so that config checks need not import torch
# (tests/diffusion keeps the two in step).
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_karras", "heun", "dpmpp_2m", "dpmpp_2m_karras")


class TimestepSpacing(str, enum.Enum):
    linspace = "linspace"
    leading = "leading"
    trailing = "trailing"


class TextLayer(str, enum.Enum):
    last = "last"
    penultimate = "penultimate"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ReconLoss(str, enum.Enum):
    l1 = "l1"
    l2 = "l2"


class FSDPSharding(str, enum.Enum):
    full = "full"
    hybrid = "hybrid"


# trainer.accelerator / trainer.precision values Lightning knows (checked here so that a typo fails
# before anything is built).
ACCELERATOR_NAMES = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
PRECISION_NAMES = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64",
                   "bf16", "16", "transformer-engine", "transformer-engine-float16")

# Precisions that train under fp16 autocast with a GradScaler.
FP16_SCALED = ("16-mixed", "16")

# Precisions that cast every weight (frozen encoders included) while the systems keep latents,
# context and losses in float32: the first convolution would fail on mixed dtypes.
WHOLE_MODEL_PRECISIONS = ("bf16-true", "16-true", "64-true", "64")

# The names trainer.strategy accepts (mmdiff.run.strategies.STRATEGY_NAMES; tests keep the two in step).
STRATEGY_NAMES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp")


class PrecomputeLatents(str, enum.Enum):
    """What ``mmdiff precompute`` stores of the VAE posterior (see mmdiff.jobs.precompute)."""

    distribution = "distribution"  # mean + log-variance: a fresh latent is drawn every step
    mean = "mean"
    sample = "sample"  # one posterior draw, fixed for all epochs


class ArrayDtype(str, enum.Enum):
    fp16 = "fp16"
    fp32 = "fp32"


class UNetCompile(str, enum.Enum):
    none = "none"  # ("off" would read as a YAML boolean)
    full = "full"  # torch.compile of the whole U-Net
    regional = "regional"  # torch.compile of each down/mid/up block (much shorter compile times)


class ImageEmbedConditioning(str, enum.Enum):
    """How a text_to_image U-Net sees a CLIP image embedding (the unCLIP decoder; docs/unclip.md)."""

    none = "none"
    time = "time"  # projected and added to the timestep embedding
    tokens = "tokens"  # projected to model.image_embed_tokens extra cross-attention context tokens
    both = "both"


# ------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Webdataset shards and the image/caption pipeline."""

    train_shards: List[str] = field(default_factory=list)
    val_shards: List[str] = field(default_factory=list)
    image_size: int = 32
    crop: Crop = Crop.center
    random_flip: bool = False
    # "txt" reads the caption member; "json:FIELD" reads FIELD of the json member.
    caption_key: str = "txt"
    batch_size: int = 32
    val_batch_size: int = 64
    num_workers: int = 2
    # Training reads resampled shards: an epoch is this many batches per rank.
    steps_per_epoch: int = 1000
    # Raw (undecoded) samples each training worker shuffles through; 0 or 1 = no shuffling.
    shuffle_buffer: int = 1000
    # Images whose header announces more pixels are skipped as possible decompression bombs
    # (40 Mpx; mmdiff.data.decode.DEFAULT_MAX_IMAGE_PIXELS).
    max_image_pixels: int = 40_000_000
    # False: do not decode images (batches carry captions and `array_keys` only).
    load_images: bool = True
    # Names of NAME.npy members to load into the batch as tensors (e.g. precomputed latents).
    array_keys: List[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """Arguments for ``lightning.Trainer`` plus checkpoint cadence."""

    max_steps: int = 1000
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1
    val_every_n_steps: int = 500
    limit_val_batches: Optional[int] = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    keep_last_n: int = 3
    deterministic: bool = False
    enable_progress_bar: bool = True
    # strategy 'fsdp' (FSDP2 on the trainable modules): 'full' shards over all ranks, 'hybrid'
    # shards within a node and replicates across nodes.
    fsdp_sharding: FSDPSharding = FSDPSharding.full
    # Reseed torch's RNG per training batch from (seed, rank, batch index) and checkpoint every
    # rank's data position, so a resumed run repeats exactly what an uninterrupted one does.
    exact_resume: bool = True
    # Fused AdamW kernel; null = on when the parameters are on a CUDA device or the CPU (off under
    # 16-mixed with gradient clipping, which the fused kernel cannot do).
    fused_adamw: Optional[bool] = None
    # TF32 matmuls and convolutions on Ampere and newer GPUs (no effect on CPU).
    tf32: bool = True
    # Skip (and count as train/skipped_nonfinite) optimiser steps with a NaN/Inf loss or gradient;
    # stop the run after max_bad_steps of them in a row (docs/reliability.md).
    nan_guard: bool = True
    max_bad_steps: int = 5
    # Every N steps append RSS (main + worker processes) and open file descriptors to
    # RUN_DIR/resources.csv (a leak probe for long runs; 0 = off).
    probe_resources_every_n_steps: int = 0


@dataclass
class LoggerConfig:
    """Weights & Biases (offline by default), CSV, or nothing."""

    kind: LoggerKind = LoggerKind.wandb
    project: str = "mmdiff"
    mode: WandbMode = WandbMode.offline
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then constant or cosine decay."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: LRSchedule = LRSchedule.cosine
    min_lr_ratio: float = 0.0


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion process and its training objective (see mmdiff.diffusion)."""

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = BetaSchedule.scaled_linear
    beta_start: float = 0.00085
    beta_end: float = 0.012
    betas: List[float] = field(default_factory=list)
    zero_terminal_snr: bool = False
    prediction_type: PredictionType = PredictionType.epsilon
    loss_weighting: LossWeighting = LossWeighting.uniform
    snr_gamma: float = 5.0
    noise_offset: float = 0.0
    timestep_sampling: TimestepSampling = TimestepSampling.uniform
    variance_type: VarianceType = VarianceType.fixed_small
    vlb_weight: float = 0.001
    # Resolution shift (simple diffusion): SNR(t) is divided by resolution_shift**2, e.g. 2.0 when
    # training at twice the resolution the schedule was tuned for. 1.0 leaves the schedule as is.
    resolution_shift: float = 1.0
    # EDM preconditioning (Karras et al. 2022): the network output F gives
    # x0 = c_skip(σ) x + c_out(σ) F(c_in(σ) x). Needs prediction_type 'sample' and fixed variance.
    edm_preconditioning: bool = False
    sigma_data: float = 0.5


@dataclass
class SamplingConfig:
    """Sampler defaults for validation grids and ``mmdiff sample``."""

    sampler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 4.0
    guidance_rescale: float = 0.0
    eta: float = 0.0
    temperature: float = 1.0
    timestep_spacing: TimestepSpacing = TimestepSpacing.leading
    # Added to 'leading' timesteps only (diffusers' steps_offset; Stable Diffusion uses 1).
    steps_offset: int = 0
    # Langevin corrector steps after each sampler step (predictor-corrector) and their target SNR.
    corrector_steps: int = 0
    snr: float = 0.16
    # img2img: fraction of the schedule re-run from a noised init image (1.0 = from pure noise).
    strength: float = 1.0
    # Clamp the x0 estimate to [-v, v] at every step (pixel-space models); None = no clamping.
    clip_denoised: Optional[float] = None
    prompts: List[str] = field(default_factory=list)
    seed: int = 0
    every_n_steps: int = 500


@dataclass
class VAEConfig:
    """diffusers ``AutoencoderKL``: built from these fields, or loaded from ``pretrained``."""

    # A local diffusers folder, a .safetensors file, or an mmdiff autoencoder .ckpt; None = build.
    pretrained: Optional[str] = None
    in_channels: int = 3
    # Weight names (or fnmatch patterns) that may be missing from / extra in the pretrained file;
    # every other key must match (loading is always strict).
    ignore_keys: List[str] = field(default_factory=list)
    latent_channels: int = 4
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 32
    # None: estimate 1/std from the first `scale_estimate_batches` training batches.
    scaling_factor: Optional[float] = None
    scale_estimate_batches: int = 4
    precision: Precision = Precision.fp32
    recon_loss: ReconLoss = ReconLoss.l1
    kl_weight: float = 1e-6
    use_discriminator: bool = False
    disc_start_step: int = 2000
    disc_weight: float = 0.5
    # PatchGAN discriminator size: base channels and number of stride-2 layers.
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class ClipVisionConfig:
    image_size: int = 32
    layers: int = 2
    width: int = 64
    patch_size: int = 8
    head_width: int = 32


@dataclass
class ClipTextConfig:
    context_length: int = 32
    vocab_size: int = 49408
    width: int = 64
    heads: int = 2
    layers: int = 2


@dataclass
class ClipArchConfig:
    """A custom open_clip architecture (tiny ones for tests and the demo)."""

    embed_dim: int = 64
    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)


@dataclass
class ClipConfig:
    """open_clip text/image encoder."""

    # An open_clip model name (e.g. ViT-H-14), or "custom" to build from `arch`.
    name: str = "custom"
    # An open_clip pretrained tag, a local checkpoint file, or None for random init.
    pretrained: Optional[str] = None
    arch: ClipArchConfig = field(default_factory=ClipArchConfig)
    # Weight names (or fnmatch patterns) that may be missing from / extra in the pretrained file;
    # every other key must match (loading is always strict).
    ignore_keys: List[str] = field(default_factory=list)
    text_layer: TextLayer = TextLayer.last
    freeze: bool = True
    precision: Precision = Precision.fp32


@dataclass
class UNetConfig:
    """diffusers ``UNet2DConditionModel``; in/out channels follow the VAE latent channels."""

    pretrained: Optional[str] = None
    block_out_channels: List[int] = field(default_factory=lambda: [64, 128])
    # Weight names (or fnmatch patterns) that may be missing from / extra in the pretrained file;
    # every other key must match (loading is always strict).
    ignore_keys: List[str] = field(default_factory=list)
    down_block_types: List[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D", "DownBlock2D"]
    )
    up_block_types: List[str] = field(default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D"])
    layers_per_block: int = 1
    # Channels per attention head (a block of C channels gets C / attention_head_dim heads);
    # unlike diffusers' config key of the same name, which is the number of heads.
    attention_head_dim: int = 8
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    # None: the text encoder's width.
    cross_attention_dim: Optional[int] = None
    use_pooled_text: bool = False
    # Linear (not 1×1-conv) projections in and out of each transformer, as Stable Diffusion 2.x
    # has: needed to load SD-2 weights, and a few per cent faster (docs/performance.md). False by
    # default so checkpoints written before this key existed still load.
    use_linear_projection: bool = False
    # Speed switches (docs/performance.md). channels_last: null = on when training on a GPU.
    channels_last: Optional[bool] = None
    compile: UNetCompile = UNetCompile.none
    # Recompute activations in the backward pass: less memory, ~30% more compute.
    gradient_checkpointing: bool = False


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
    head: CaptionHeadKind = CaptionHeadKind.ar
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
    decoding: CaptionDecoding = CaptionDecoding.greedy
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


@dataclass
class ContrastiveConfig:
    """CLIP training on image–caption pairs (``system: contrastive``)."""

    # Zero-shot digit classification prompt at validation ({word} → "seven").
    digit_prompt: str = "a handwritten digit {word}"
    # open_clip ClipLoss options for multi-GPU runs.
    local_loss: bool = False
    gather_with_grad: bool = True


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


@dataclass
class ModelConfig:
    """Networks; each system uses the sub-sections it needs."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    caption_dropout: float = 0.1
    ema_decay: float = 0.9999
    use_ema: bool = True
    # Train from `mmdiff precompute` shards: batches carry `latent` (+ `latent_logvar`), `context`
    # and `pooled` arrays and the frozen encoders are skipped in the training step.
    precomputed: bool = False
    # What `mmdiff precompute` stores of the VAE posterior, and in which dtype.
    precompute_latents: PrecomputeLatents = PrecomputeLatents.distribution
    precompute_dtype: ArrayDtype = ArrayDtype.fp16
    prior: PriorConfig = field(default_factory=PriorConfig)
    # text_to_image as an unCLIP decoder: condition the U-Net on the CLIP image embedding of the
    # training image (none | time | tokens | both), zeroed in image_embed_dropout of the rows
    # (for guidance; independent of caption_dropout); `tokens` adds image_embed_tokens tokens.
    image_embed_conditioning: ImageEmbedConditioning = ImageEmbedConditioning.none
    image_embed_dropout: float = 0.1
    image_embed_tokens: int = 4
    # A text_to_image checkpoint whose weights (EMA ones when present) initialise this model;
    # only the image-embedding layers may be new, every other key must match.
    init_from: Optional[str] = None


class EvalExtractor(str, enum.Enum):
    clip = "clip"  # the model's open_clip image tower (fallback; metric keys carry its fingerprint)
    inception = "inception"  # the standard FID Inception v3, weights from eval.inception_weights


@dataclass
class EvalConfig:
    """Image metrics: ``mmdiff eval fid|kid|clipscore`` and the in-training evaluation callback."""

    extractor: EvalExtractor = EvalExtractor.clip
    # Local file of the FID Inception weights (torch-fidelity's pt_inception-2015-12-05); nothing
    # is downloaded at run time.
    inception_weights: Optional[str] = None
    # In-training evaluation every K optimiser steps (0 = off): N images, FID + CLIP score.
    every_n_steps: int = 0
    n_images: int = 64
    metrics: List[str] = field(default_factory=lambda: ["fid", "clipscore"])
    # Prompts for the generated images; empty = the captions of the reference images.
    prompts: List[str] = field(default_factory=list)
    # Reference images for FID/KID; empty = data.val_shards.
    reference_shards: List[str] = field(default_factory=list)
    # Sampler steps for the in-training evaluation (sampler and guidance come from sampling:).
    steps: int = 20
    batch_size: int = 32
    seed: int = 0


@dataclass
class ExperimentConfig:
    """One experiment: what to train, on what, how, and where to write it."""

    name: str = "experiment"
    system: str = "text_to_image"
    seed: int = 0
    run_dir: str = "runs/${name}"
    base: List[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys whose YAML value may be a single string that means a one-element list.
_STRING_OR_LIST = ("data.train_shards", "data.val_shards", "sampling.prompts", "base")


# ------------------------------------------------------------------------------------- loading
def schema() -> DictConfig:
    """The empty, typed config every experiment is merged into."""
    return OmegaConf.structured(ExperimentConfig)


def _closest_key(cfg: DictConfig, full_key: str) -> Optional[str]:
    parent_path, _, leaf = str(full_key).rpartition(".")
    node = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    if not isinstance(node, DictConfig):
        return None
    matches = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1, cutoff=0.5)
    return matches[0] if matches else None


def _wrap_merge_error(err: OmegaConfBaseException, cfg: DictConfig, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        hint = _closest_key(cfg, key)
        more = f" — did you mean '{hint}'?" if hint else ""
        return ConfigError(f"unknown key '{key}' in {source}{more}")
    if isinstance(err, ValidationError):
        first = str(getattr(err, "msg", err)).splitlines()[0]
        return ConfigError(f"bad value for '{key}' in {source}: {first}")
    return ConfigError(f"cannot read '{key}' in {source}: {str(err).splitlines()[0]}")


def _check_shapes(schema_node: Any, raw: Any, prefix: str, source: str) -> None:
    """Sections must be mappings and list keys lists (OmegaConf's own errors for these are
    unreadable or a bare TypeError)."""
    if not isinstance(raw, DictConfig) or not isinstance(schema_node, DictConfig):
        return
    for key in raw.keys():
        if key not in schema_node:
            continue  # unknown keys are reported by the merge, with the closest valid key
        dotted = f"{prefix}{key}"
        want = schema_node._get_node(key)
        got = raw._get_node(key)
        if got is None or got._is_missing() or got._is_interpolation():
            continue
        if isinstance(want, DictConfig) and not isinstance(got, DictConfig):
            raise ConfigError(
                f"'{dotted}' in {source} is a section and must hold keys, got {_shown(got)}."
            )
        if isinstance(want, ListConfig) and not isinstance(got, ListConfig) and got._value() is not None:
            raise ConfigError(f"'{dotted}' in {source} must be a list, got {_shown(got)}.")
        if isinstance(want, ListConfig) and isinstance(got, ListConfig) and any(
            isinstance(item, (DictConfig, ListConfig)) for item in got._iter_ex(resolve=False)
        ):  # every list in the schema holds plain values; OmegaConf would let a mapping in
            raise ConfigError(f"'{dotted}' in {source} must be a list of plain values, got {_shown(got)}.")
        if isinstance(want, DictConfig):
            _check_shapes(want, got, f"{dotted}.", source)


def _shown(node: Any) -> str:
    value = OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node._value()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _normalise_lists(raw: DictConfig) -> None:
    for dotted in _STRING_OR_LIST:
        try:
            value = OmegaConf.select(raw, dotted, default=None)
        except (OmegaConfBaseException, TypeError):  # a parent that is not a mapping: _check_shapes says so
            continue
        if isinstance(value, str):
            OmegaConf.update(raw, dotted, [value], merge=False)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file.")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: report the first line only
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}")
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections at the top level.")
    check_resolvers(raw, str(_display(path)))
    _normalise_lists(raw)
    return raw


def _merge_file(cfg: DictConfig, path: Path, seen: tuple[Path, ...]) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base:'.")
    raw = _read_yaml(path)
    bases = raw.get("base", None) or []
    if not isinstance(bases, (list, ListConfig)) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"'base' in {_display(path)} must be a list of YAML file paths.")
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        cfg = _merge_file(cfg, base_path, seen + (path,))
    _check_shapes(cfg, raw, "", str(_display(path)))
    try:
        return OmegaConf.merge(cfg, raw)
    except OmegaConfBaseException as err:
        raise _wrap_merge_error(err, cfg, str(_display(path))) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot merge {_display(path)}: {str(err).splitlines()[0]}") from None


def _display(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Merge ``key=value`` command-line overrides into a typed config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value.")
        try:
            update = OmegaConf.from_dotlist([item])
        except Exception as err:  # OmegaConf grammar and YAML parser errors alike: first line only
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot parse override '{item}': {first}") from None
        check_resolvers(update, "the command line")
        _normalise_lists(update)
        _check_shapes(cfg, update, "", "the command line")
        try:
            cfg = OmegaConf.merge(cfg, update)
        except OmegaConfBaseException as err:
            raise _wrap_merge_error(err, cfg, "the command line") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot apply override '{item}': {str(err).splitlines()[0]}") from None
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load, merge, override, resolve and check an experiment config.

    Raises :class:`ConfigError` (exit code 2) naming the key and file on any problem; reads no
    data and builds no model.
    """
    cfg = _merge_file(schema(), Path(path), ())
    cfg = apply_overrides(cfg, overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise ConfigError(
            f"cannot resolve '{key}' in {_display(Path(path))}: {str(err).splitlines()[0]}"
        ) from None
    cfg.base = []
    _check_complete(cfg, Path(path))
    check_values(cfg)
    check_no_secrets(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _check_complete(cfg: DictConfig, path: Path) -> None:
    """No ``???`` (missing) values and no NaN/Inf numbers anywhere in the config."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"'{missing[0]}' has no value (???) in {_display(path)}; set it in the file or with "
            f"{missing[0]}=VALUE."
        )

    def walk(node: Any, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            dotted = f"{prefix}.{key}" if isinstance(node, dict) else f"{prefix}[{key}]"
            if isinstance(value, (dict, list)):
                walk(value, dotted.lstrip("."))
            elif isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"'{dotted.lstrip('.')}' must be a finite number, got {value}.")

    walk(OmegaConf.to_container(cfg, resolve=True), "")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_eval(e: DictConfig) -> None:
    _require(e.every_n_steps >= 0, f"eval.every_n_steps must be >= 0 (0 = off), got {e.every_n_steps}.")
    _require(e.n_images >= 2, f"eval.n_images must be at least 2 (FID needs two), got {e.n_images}.")
    _require(e.steps > 0 and e.batch_size > 0, "eval.steps and eval.batch_size must be positive.")
    bad = [m for m in e.metrics if m not in ("fid", "kid", "clipscore")]
    _require(not bad, f"eval.metrics {bad} are unknown; choose from fid, kid, clipscore.")


def check_values(cfg: DictConfig) -> None:
    """Range and consistency checks that types alone cannot express."""
    from mmdiff.systems.registry import system_names

    _require(
        cfg.system in system_names(),
        f"unknown system '{cfg.system}'; choose one of: {', '.join(sorted(system_names()))}.",
    )
    d, t, o = cfg.data, cfg.trainer, cfg.optim
    _require(d.image_size > 0, f"data.image_size must be positive, got {d.image_size}.")
    _require(d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}.")
    _require(d.val_batch_size > 0, f"data.val_batch_size must be positive, got {d.val_batch_size}.")
    _require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}.")
    _require(d.steps_per_epoch > 0, f"data.steps_per_epoch must be positive, got {d.steps_per_epoch}.")
    _require(
        d.caption_key == "txt" or d.caption_key.startswith("json:"),
        f"data.caption_key must be 'txt' or 'json:FIELD', got '{d.caption_key}'.",
    )
    _require(d.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}.")
    _require(d.max_image_pixels > 0, f"data.max_image_pixels must be positive, got {d.max_image_pixels}.")
    for name in d.array_keys:
        _require(
            bool(name) and "/" not in name and not name.endswith(".npy"),
            f"data.array_keys entries name NAME.npy members without the '.npy', got '{name}'.",
        )
    _require(
        d.load_images or len(d.array_keys) > 0,
        "data.load_images is false and data.array_keys is empty: batches would hold no tensors.",
    )
    _require(t.max_steps > 0, f"trainer.max_steps must be positive, got {t.max_steps}.")
    _require(
        t.probe_resources_every_n_steps >= 0,
        f"trainer.probe_resources_every_n_steps must be >= 0, got {t.probe_resources_every_n_steps}.",
    )
    _require(t.max_bad_steps > 0, f"trainer.max_bad_steps must be positive, got {t.max_bad_steps}.")
    _require(
        t.keep_last_n >= -1,
        f"trainer.keep_last_n must be -1 (keep all), 0 (only last.ckpt) or positive, got {t.keep_last_n}.",
    )
    _require(t.num_nodes > 0, f"trainer.num_nodes must be positive, got {t.num_nodes}.")
    _require(
        str(t.accelerator) in ACCELERATOR_NAMES,
        f"unknown trainer.accelerator '{t.accelerator}'; choose one of: {', '.join(ACCELERATOR_NAMES)}.",
    )
    _require(
        str(t.devices) == "auto" or re.fullmatch(r"-1|[1-9][0-9]*|[0-9]+(,[0-9]*)+", str(t.devices)) is not None,
        f"trainer.devices must be 'auto', a positive count, -1 (all) or a list like '0,1', got '{t.devices}'.",
    )
    _require(
        str(t.precision) in PRECISION_NAMES,
        f"unknown trainer.precision '{t.precision}'; choose one of: {', '.join(PRECISION_NAMES)}.",
    )
    _require(
        str(t.precision) not in WHOLE_MODEL_PRECISIONS,
        f"trainer.precision={t.precision} is not supported (it casts every weight, while mmdiff keeps "
        "latents, conditioning and losses in float32); "
        "use bf16-mixed, 16-mixed or 32-true.",
    )
    _require(t.gradient_clip_val >= 0, f"trainer.gradient_clip_val must be >= 0 (0 = off), got {t.gradient_clip_val}.")
    _require(
        not (t.fused_adamw is True and str(t.precision) in FP16_SCALED and t.gradient_clip_val > 0),
        "trainer.fused_adamw=true cannot clip gradients under fp16's GradScaler (it unscales inside "
        "its step); use trainer.precision=bf16-mixed, trainer.gradient_clip_val=0 or trainer.fused_adamw=null.",
    )
    for key in ("accumulate_grad_batches", "val_every_n_steps", "log_every_n_steps", "checkpoint_every_n_steps"):
        _require(t[key] > 0, f"trainer.{key} must be positive, got {t[key]}.")
    # Lightning steps the optimiser at every epoch end, so a pass that is not a whole number of
    # accumulation windows would take a short step and shift every step count after it.
    _require(
        d.steps_per_epoch % t.accumulate_grad_batches == 0,
        f"data.steps_per_epoch ({d.steps_per_epoch}) must be a multiple of trainer.accumulate_grad_batches "
        f"({t.accumulate_grad_batches}).",
    )
    _require(
        t.limit_val_batches is None or t.limit_val_batches >= 0,
        f"trainer.limit_val_batches must be >= 0 or null, got {t.limit_val_batches}.",
    )
    _require(0 <= cfg.seed < 2**32, f"seed must be in [0, 2**32), got {cfg.seed}.")
    _require(
        str(t.strategy) in STRATEGY_NAMES,
        f"unknown trainer.strategy '{t.strategy}'; choose one of: {', '.join(STRATEGY_NAMES)}.",
    )
    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr}.")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
    _require(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        f"optim.betas must hold two numbers in [0, 1), got {list(o.betas)}.",
    )
    _require(o.eps > 0, f"optim.eps must be positive, got {o.eps}.")
    _require(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
    _require(0.0 <= cfg.model.caption_dropout <= 1.0, "model.caption_dropout must be in [0, 1].")
    _require(0.0 < cfg.model.ema_decay < 1.0, "model.ema_decay must be in (0, 1).")
    _check_eval(cfg.eval)
    diff = cfg.diffusion
    _require(diff.num_train_timesteps > 1, "diffusion.num_train_timesteps must be > 1.")
    _require(
        diff.beta_schedule != BetaSchedule.custom or len(diff.betas) > 1,
        "diffusion.beta_schedule is 'custom' but diffusion.betas lists no values.",
    )
    _require(
        diff.beta_schedule != BetaSchedule.custom or len(diff.betas) == diff.num_train_timesteps,
        f"diffusion.betas lists {len(diff.betas)} values but diffusion.num_train_timesteps is "
        f"{diff.num_train_timesteps}; make them equal.",
    )
    _require(
        all(0.0 < b <= 1.0 for b in diff.betas), "diffusion.betas must all lie in (0, 1]."
    )
    _require(
        0.0 < diff.beta_start <= diff.beta_end < 1.0,
        "diffusion.beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1.",
    )
    _require(diff.snr_gamma > 0, f"diffusion.snr_gamma must be positive, got {diff.snr_gamma}.")
    _require(diff.noise_offset >= 0, f"diffusion.noise_offset must be >= 0, got {diff.noise_offset}.")
    _require(diff.vlb_weight >= 0, f"diffusion.vlb_weight must be >= 0, got {diff.vlb_weight}.")
    _require(
        diff.resolution_shift > 0,
        f"diffusion.resolution_shift must be positive, got {diff.resolution_shift}.",
    )
    _require(diff.sigma_data > 0, f"diffusion.sigma_data must be positive, got {diff.sigma_data}.")
    _require(
        not diff.edm_preconditioning or diff.prediction_type == PredictionType.sample,
        "diffusion.edm_preconditioning needs diffusion.prediction_type=sample (the preconditioned "
        "network predicts x0).",
    )
    _require(
        not diff.edm_preconditioning or diff.variance_type != VarianceType.learned_range,
        "diffusion.edm_preconditioning cannot be combined with variance_type=learned_range.",
    )
    s = cfg.sampling
    _require(
        s.sampler in SAMPLER_NAMES,
        f"unknown sampling.sampler '{s.sampler}'; choose one of: {', '.join(SAMPLER_NAMES)}.",
    )
    _require(s.steps > 0, f"sampling.steps must be positive, got {s.steps}.")
    _require(
        s.every_n_steps >= 0,
        f"sampling.every_n_steps must be >= 0 (0 = previews only at the start and end), got {s.every_n_steps}.",
    )
    _require(
        s.steps <= diff.num_train_timesteps,
        f"sampling.steps ({s.steps}) cannot exceed diffusion.num_train_timesteps "
        f"({diff.num_train_timesteps}).",
    )
    _require(s.guidance_scale >= 0, "sampling.guidance_scale must be >= 0.")
    _require(0.0 <= s.guidance_rescale <= 1.0, "sampling.guidance_rescale must be in [0, 1].")
    _require(s.eta >= 0, "sampling.eta must be >= 0.")
    _require(s.temperature >= 0, "sampling.temperature must be >= 0.")
    _require(s.steps_offset >= 0, "sampling.steps_offset must be >= 0.")
    _require(s.corrector_steps >= 0, "sampling.corrector_steps must be >= 0.")
    _require(s.snr > 0, "sampling.snr must be positive.")
    _require(0.0 < s.strength <= 1.0, "sampling.strength must be in (0, 1].")
    _require(
        s.clip_denoised is None or s.clip_denoised > 0,
        "sampling.clip_denoised must be positive or null.",
    )
    vae = cfg.model.vae
    factor = 2 ** (len(vae.block_out_channels) - 1)
    _require(
        cfg.system == "autoencoder" or vae.pretrained is not None or d.image_size % factor == 0,
        f"data.image_size {d.image_size} is not divisible by the VAE's down-sampling factor {factor}.",
    )
    _check_models(cfg)
    _check_caption(cfg)
    _check_precomputed(cfg)
    _check_unclip(cfg)


def _check_unclip(cfg: DictConfig) -> None:
    """model.prior and the unCLIP decoder keys (model.image_embed_*, model.init_from)."""
    m, p = cfg.model, cfg.model.prior
    _require(
        p.width > 0 and p.heads > 0 and p.width % p.heads == 0,
        f"model.prior.width {p.width} must be a positive multiple of model.prior.heads {p.heads}.",
    )
    _require(p.layers > 0, f"model.prior.layers must be positive, got {p.layers}.")
    _require(p.mlp_ratio > 0, f"model.prior.mlp_ratio must be positive, got {p.mlp_ratio}.")
    _require(0.0 <= p.dropout < 1.0, f"model.prior.dropout must be in [0, 1), got {p.dropout}.")
    _require(p.candidates > 0, f"model.prior.candidates must be positive, got {p.candidates}.")
    _require(
        0.0 <= m.image_embed_dropout <= 1.0,
        f"model.image_embed_dropout must be in [0, 1], got {m.image_embed_dropout}.",
    )
    _require(m.image_embed_tokens > 0, f"model.image_embed_tokens must be positive, got {m.image_embed_tokens}.")
    conditioned = m.image_embed_conditioning != ImageEmbedConditioning.none
    _require(
        not conditioned or cfg.system == "text_to_image",
        f"model.image_embed_conditioning is for the text_to_image system, not '{cfg.system}'.",
    )
    _require(
        not conditioned or not m.precomputed,
        "model.image_embed_conditioning needs the training images (the CLIP image embedding is "
        "computed from them); it cannot be combined with model.precomputed.",
    )
    _require(
        m.init_from is None or cfg.system == "text_to_image",
        f"model.init_from is for the text_to_image system, not '{cfg.system}'.",
    )


# The arrays a batch of `mmdiff precompute` shards must carry (mmdiff.jobs.precompute writes them).
PRECOMPUTED_KEYS = ("latent", "context")


def _check_precomputed(cfg: DictConfig) -> None:
    m, d = cfg.model, cfg.data
    if not m.precomputed:
        return
    _require(
        cfg.system == "text_to_image",
        f"model.precomputed is only for the text_to_image system, not '{cfg.system}'.",
    )
    _require(
        not d.load_images,
        "model.precomputed is true but data.load_images is too; precomputed shards hold no images "
        "(set data.load_images=false, or add the precompute folder's precomputed.yaml to base:).",
    )
    needed = list(PRECOMPUTED_KEYS) + (["pooled"] if m.unet.use_pooled_text else [])
    missing = [k for k in needed if k not in d.array_keys]
    _require(
        not missing,
        f"model.precomputed is true but data.array_keys lacks {missing}; use e.g. "
        "data.array_keys=[latent,latent_logvar,context,pooled] (see the precompute folder's "
        "precomputed.yaml).",
    )


def _check_caption(cfg: DictConfig) -> None:
    """model.caption / model.contrastive checks."""
    c = cfg.model.caption
    _require(c.width > 0 and c.heads > 0, "model.caption.width and model.caption.heads must be positive.")
    _require(
        c.width % c.heads == 0,
        f"model.caption.width {c.width} must be divisible by model.caption.heads {c.heads}.",
    )
    _require(c.layers > 0, f"model.caption.layers must be positive, got {c.layers}.")
    _require(c.mlp_ratio > 0, f"model.caption.mlp_ratio must be positive, got {c.mlp_ratio}.")
    _require(0.0 <= c.dropout < 1.0, f"model.caption.dropout must be in [0, 1), got {c.dropout}.")
    _require(c.max_length >= 3, f"model.caption.max_length must be >= 3, got {c.max_length}.")
    _require(
        c.vocab_limit == 0 or c.vocab_limit >= 2,
        f"model.caption.vocab_limit must be 0 (whole vocabulary) or >= 2, got {c.vocab_limit}.",
    )
    _require(c.vocab_scan_captions > 0, "model.caption.vocab_scan_captions must be positive.")
    _require(
        0.0 <= c.label_smoothing < 1.0,
        f"model.caption.label_smoothing must be in [0, 1), got {c.label_smoothing}.",
    )
    _require(c.temperature >= 0, f"model.caption.temperature must be >= 0, got {c.temperature}.")
    _require(c.top_k > 0, f"model.caption.top_k must be positive, got {c.top_k}.")
    _require(0.0 < c.top_p <= 1.0, f"model.caption.top_p must be in (0, 1], got {c.top_p}.")
    _require(c.beam_size > 0, f"model.caption.beam_size must be positive, got {c.beam_size}.")
    _require(c.length_penalty >= 0, "model.caption.length_penalty must be >= 0.")
    _require(c.steps > 0, f"model.caption.steps must be positive, got {c.steps}.")
    _require(c.table_rows >= 0, f"model.caption.table_rows must be >= 0, got {c.table_rows}.")
    _require(
        not (c.head == CaptionHeadKind.masked and c.decoding == CaptionDecoding.beam),
        "model.caption.decoding 'beam' needs model.caption.head 'ar'; the masked head decodes "
        "with greedy, topk or topp.",
    )
    prompt = cfg.model.contrastive.digit_prompt
    _require(
        "{word}" in prompt or "{numeral}" in prompt,
        f"model.contrastive.digit_prompt must contain {{word}} or {{numeral}}, got '{prompt}'.",
    )


def _divides(group: int, channels: Sequence[int]) -> bool:
    return group > 0 and all(c > 0 and c % group == 0 for c in channels)


def _check_models(cfg: DictConfig) -> None:
    """Architecture checks for model.vae / model.clip / model.unet (the sections a system uses)."""
    v = cfg.model.vae
    ch = list(v.block_out_channels)
    _require(len(ch) > 0, "model.vae.block_out_channels must list at least one width.")
    if v.pretrained is None:
        _require(
            _divides(v.norm_num_groups, ch),
            f"model.vae.block_out_channels {ch} must all be divisible by model.vae.norm_num_groups "
            f"{v.norm_num_groups}.",
        )
    _require(v.in_channels > 0, "model.vae.in_channels must be positive.")
    _require(v.latent_channels > 0, "model.vae.latent_channels must be positive.")
    _require(v.layers_per_block > 0, "model.vae.layers_per_block must be positive.")
    _require(v.kl_weight >= 0, f"model.vae.kl_weight must be >= 0, got {v.kl_weight}.")
    _require(
        v.scaling_factor is None or v.scaling_factor > 0,
        f"model.vae.scaling_factor must be positive or null, got {v.scaling_factor}.",
    )
    _require(v.scale_estimate_batches > 0, "model.vae.scale_estimate_batches must be positive.")
    _require(v.disc_start_step >= 0, "model.vae.disc_start_step must be >= 0.")
    _require(v.disc_weight >= 0, "model.vae.disc_weight must be >= 0.")
    _require(v.disc_channels > 0, "model.vae.disc_channels must be positive.")
    _require(v.disc_layers > 0, "model.vae.disc_layers must be positive.")
    if cfg.system == "autoencoder":
        return
    c = cfg.model.clip
    if c.name == "custom":
        a, vis, txt = c.arch, c.arch.vision, c.arch.text
        _require(a.embed_dim > 0, "model.clip.arch.embed_dim must be positive.")
        _require(
            txt.heads > 0 and txt.width % txt.heads == 0,
            f"model.clip.arch.text.width {txt.width} must be divisible by text.heads {txt.heads}.",
        )
        _require(
            vis.head_width > 0 and vis.width % vis.head_width == 0,
            f"model.clip.arch.vision.width {vis.width} must be divisible by vision.head_width "
            f"{vis.head_width}.",
        )
        _require(
            vis.patch_size > 0 and vis.image_size % vis.patch_size == 0,
            f"model.clip.arch.vision.image_size {vis.image_size} must be divisible by "
            f"vision.patch_size {vis.patch_size}.",
        )
        _require(txt.context_length > 0, "model.clip.arch.text.context_length must be positive.")
        _require(vis.layers > 0 and txt.layers > 0, "model.clip.arch layers must be positive.")
        _require(
            c.text_layer != TextLayer.penultimate or txt.layers >= 2,
            "model.clip.text_layer 'penultimate' needs model.clip.arch.text.layers >= 2.",
        )
    u = cfg.model.unet
    if u.pretrained is None:
        uch = list(u.block_out_channels)
        _require(
            len(u.down_block_types) == len(uch) == len(u.up_block_types),
            f"model.unet.down_block_types, up_block_types and block_out_channels must have the "
            f"same length, got {len(u.down_block_types)}, {len(u.up_block_types)} and {len(uch)}.",
        )
        _require(
            _divides(u.attention_head_dim, uch),
            f"model.unet.block_out_channels {uch} must all be divisible by "
            f"model.unet.attention_head_dim {u.attention_head_dim}.",
        )
        _require(
            _divides(u.norm_num_groups, uch),
            f"model.unet.block_out_channels {uch} must all be divisible by "
            f"model.unet.norm_num_groups {u.norm_num_groups}.",
        )
        _require(u.layers_per_block > 0, "model.unet.layers_per_block must be positive.")
        _require(
            u.transformer_layers_per_block > 0,
            "model.unet.transformer_layers_per_block must be positive.",
        )
        _require(
            u.cross_attention_dim is None or u.cross_attention_dim > 0,
            "model.unet.cross_attention_dim must be positive or null.",
        )


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (enums as their names)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``RUN_DIR/config.yaml`` and return the path.

    Refuses (:class:`ConfigError`, nothing written) a config that calls a resolver outside the
    allow-list or holds a secret's value (:mod:`mmdiff.config.guard`).
    """
    check_resolvers(cfg)
    check_no_secrets(cfg)
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of every node writes the same file (a shared run dir): a temp name of its own
    # keeps one rank's rename from taking another's temp file away.
    tmp = out.with_name(f"config.yaml.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(out)
    return out


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    """A plain dict of the resolved config (for loggers and checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


#: Values older checkpoints hold that the schema has since renamed: (section path, key) → {old: new}.
_RENAMED_VALUES: Dict[Tuple[Tuple[str, ...], str], Dict[Any, Any]] = {
    (("model", "unet"), "compile"): {"off": "none", False: "none"},
}


def _upgrade(data: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's saved config with renamed values replaced by their current names."""
    data = copy.deepcopy(data)
    for (path, key), renames in _RENAMED_VALUES.items():
        section: Any = data
        for name in path:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section:
            value = section[key]
            if isinstance(value, (str, bool)) and value in renames:
                section[key] = renames[value]
    return data


def from_container(data: Dict[str, Any]) -> DictConfig:
    """Rebuild a typed config from :func:`to_container` output (e.g. from a checkpoint)."""
    check_resolvers(data, "the saved config")
    cfg = OmegaConf.merge(schema(), OmegaConf.create(_upgrade(data)))
    assert isinstance(cfg, DictConfig)
    return cfg


__all__ = [
    "ExperimentConfig",
    "load_config",
    "apply_overrides",
    "save_config",
    "to_yaml",
    "to_container",
    "from_container",
    "schema",
]
