"""The root :class:`ExperimentConfig`, the ``model:`` section, and the checks run on a loaded config:
each section's own ``check(node, cfg)`` (beside its fields), then the model sections the selected
system builds."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Tuple

from omegaconf import DictConfig, OmegaConf

from mmdiff.config.adapters import LoRAConfig
from mmdiff.config.bucket_spec import BucketConfig
from mmdiff.config.data import DataConfig
from mmdiff.config.diffusion import DiffusionConfig, SamplingConfig
from mmdiff.config.eval import EvalConfig
from mmdiff.config.fields import require
from mmdiff.config.models import ClipConfig, UNetConfig, VAEConfig
from mmdiff.config.systems import CaptionConfig, ContrastiveConfig, PriorConfig, TextToImageOptions
from mmdiff.config.trainer import LoggerConfig, OptimConfig, TrainerConfig
from mmdiff.systems.registry import system_names


@dataclass
class ModelConfig(TextToImageOptions):
    """Networks; each system uses the sub-sections it needs (text_to_image-only keys: the base class)."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    caption_dropout: float = 0.1
    ema_decay: float = 0.9999
    use_ema: bool = True
    prior: PriorConfig = field(default_factory=PriorConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @staticmethod
    def check(m: DictConfig, cfg: DictConfig) -> None:
        require(0.0 <= m.caption_dropout <= 1.0, "model.caption_dropout must be in [0, 1].")
        require(0.0 < m.ema_decay < 1.0, "model.ema_decay must be in (0, 1).")
        TextToImageOptions.check(m, cfg)


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

    @staticmethod
    def check(cfg: DictConfig, _: DictConfig) -> None:
        require(0 <= cfg.seed < 2**32, f"seed must be in [0, 2**32), got {cfg.seed}.")


def schema() -> DictConfig:
    """The empty, typed config every experiment is merged into."""
    return OmegaConf.structured(ExperimentConfig)


Check = Callable[[DictConfig, DictConfig], None]

#: (section, check) run on every config, in this order.
SECTION_CHECKS: Tuple[Tuple[str, Check], ...] = (
    ("data", DataConfig.check),
    ("data.buckets", BucketConfig.check),
    ("trainer", TrainerConfig.check),
    ("logger", LoggerConfig.check),
    ("", ExperimentConfig.check),
    ("optim", OptimConfig.check),
    ("model", ModelConfig.check),
    ("eval", EvalConfig.check),
    ("diffusion", DiffusionConfig.check),
    ("sampling", SamplingConfig.check),
    ("model.vae", VAEConfig.check),
    ("model.clip", ClipConfig.check_training),
    ("model.caption", CaptionConfig.check),
    ("model.contrastive", ContrastiveConfig.check),
    ("model.prior", PriorConfig.check),
    ("model.lora", LoRAConfig.check),
)

#: The model sections each system builds, checked only when it is selected; a system not listed
#: (e.g. one a plugin registers) gets all of DEFAULT_SYSTEM_CHECKS.
DEFAULT_SYSTEM_CHECKS: Tuple[Tuple[str, Check], ...] = (
    ("model.vae", VAEConfig.check_latent_size),
    ("model.clip", ClipConfig.check),
    ("model.unet", UNetConfig.check),
)
SYSTEM_CHECKS: Dict[str, Tuple[Tuple[str, Check], ...]] = {"autoencoder": ()}


def choice_fields(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any, dataclasses.Field]]:
    """(dotted key, value, field) of every field of a typed config that has metadata, depth first."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return
    for f in dataclasses.fields(kind):
        child = node._get_node(f.name)
        if isinstance(child, DictConfig):
            yield from choice_fields(child, f"{prefix}{f.name}.")
        elif f.metadata:
            yield f"{prefix}{f.name}", node[f.name], f


def check_values(cfg: DictConfig) -> None:
    """Range and consistency checks that types alone cannot express (one :class:`ConfigError`)."""
    require(
        cfg.system in system_names(),
        f"unknown system '{cfg.system}'; choose one of: {', '.join(sorted(system_names()))}.",
    )
    for key, value, f in choice_fields(cfg):
        choices, system = f.metadata.get("choices"), f.metadata.get("system")
        require(
            not choices or value in choices,
            f"unknown {key} '{value}'; choose one of: {', '.join(choices or ())}.",
        )
        require(
            not system or cfg.system == system or value == f.default,
            f"{key} is only for the {system} system, not '{cfg.system}'.",
        )
    for path, check in SECTION_CHECKS + SYSTEM_CHECKS.get(cfg.system, DEFAULT_SYSTEM_CHECKS):
        check(OmegaConf.select(cfg, path) if path else cfg, cfg)
