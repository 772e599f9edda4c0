"""Typed experiment configs: YAML + ``base:`` files + ``key=value`` overrides, checked early.

Every experiment is one YAML file validated against :class:`ExperimentConfig` (OmegaConf
structured configs). Unknown keys, wrong types and values outside a field's choices fail before any
model is built or any data is read, with one line that names the key, the file it came from and the
closest valid key. Choice fields hold plain strings (the enums below list their values).

* :mod:`.loading` — reading, ``base:``, overrides, upgrades, saving;
* :mod:`.schema` — the root config and the order of the section checks;
* shared sections: :mod:`.data`, :mod:`.trainer` (trainer, logger, optim), :mod:`.diffusion`
  (diffusion, sampling), :mod:`.models` (vae, clip, unet), :mod:`.eval`;
* per-system options: :mod:`.systems` (caption, contrastive, prior, text_to_image-only keys),
  :mod:`.adapters` (``model.lora``).
"""
from mmdiff.config.adapters import LoRAConfig, LoRAInit
from mmdiff.config.data import Crop, DataConfig
from mmdiff.config.diffusion import (
    BetaSchedule,
    DiffusionConfig,
    LossWeighting,
    PredictionType,
    SamplingConfig,
    TimestepSampling,
    VarianceType,
)
from mmdiff.config.eval import EvalConfig, EvalExtractor
from mmdiff.config.loading import (
    apply_overrides,
    from_container,
    load_config,
    save_config,
    to_container,
    to_yaml,
)
from mmdiff.config.models import (
    ClipArchConfig,
    ClipConfig,
    ClipTextConfig,
    ClipVisionConfig,
    Precision,
    ReconLoss,
    TextLayer,
    UNetCompile,
    UNetConfig,
    VAEConfig,
)
from mmdiff.config.schema import ExperimentConfig, ModelConfig, check_values, schema
from mmdiff.config.systems import (
    PRECOMPUTED_KEYS,
    ArrayDtype,
    CaptionConfig,
    CaptionDecoding,
    CaptionHeadKind,
    ContrastiveConfig,
    ImageEmbedConditioning,
    PrecomputeLatents,
    PriorConfig,
    TextToImageOptions,
)
from mmdiff.config.trainer import (
    ACCELERATOR_NAMES,
    FP16_SCALED,
    PRECISION_NAMES,
    STRATEGY_NAMES,
    CheckpointUpload,
    FSDPSharding,
    LoggerConfig,
    LoggerKind,
    LRSchedule,
    OptimConfig,
    TrainerConfig,
    WandbMode,
)
from mmdiff.diffusion.options import SAMPLER_NAMES
from mmdiff.errors import ConfigError

__all__ = [
    "ExperimentConfig",
    "ModelConfig",
    "load_config",
    "apply_overrides",
    "check_values",
    "save_config",
    "to_yaml",
    "to_container",
    "from_container",
    "schema",
    "ConfigError",
    "SAMPLER_NAMES",
    "ACCELERATOR_NAMES",
    "PRECISION_NAMES",
    "STRATEGY_NAMES",
    "FP16_SCALED",
    "PRECOMPUTED_KEYS",
    "DataConfig",
    "DiffusionConfig",
    "SamplingConfig",
    "EvalConfig",
    "VAEConfig",
    "ClipConfig",
    "ClipArchConfig",
    "ClipTextConfig",
    "ClipVisionConfig",
    "UNetConfig",
    "CaptionConfig",
    "ContrastiveConfig",
    "PriorConfig",
    "LoRAConfig",
    "LoRAInit",
    "TextToImageOptions",
    "TrainerConfig",
    "LoggerConfig",
    "CheckpointUpload",
    "OptimConfig",
    "Crop",
    "BetaSchedule",
    "PredictionType",
    "LossWeighting",
    "TimestepSampling",
    "VarianceType",
    "EvalExtractor",
    "Precision",
    "ReconLoss",
    "TextLayer",
    "UNetCompile",
    "ArrayDtype",
    "CaptionDecoding",
    "CaptionHeadKind",
    "ImageEmbedConditioning",
    "PrecomputeLatents",
    "FSDPSharding",
    "LoggerKind",
    "LRSchedule",
    "WandbMode",
]
