"""The ``diffusion:`` (process and objective) and ``sampling:`` sections."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig

from mmdiff.config.fields import choice, require
from mmdiff.config.image_sizes import parse_sizes
from mmdiff.diffusion.options import SamplingOptions
from mmdiff.errors import ConfigError


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


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion process and its training objective (see mmdiff.diffusion)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = choice(BetaSchedule.scaled_linear)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    betas: List[float] = field(default_factory=list)
    zero_terminal_snr: bool = False
    prediction_type: str = choice(PredictionType.epsilon)
    loss_weighting: str = choice(LossWeighting.uniform)
    snr_gamma: float = 5.0
    noise_offset: float = 0.0
    timestep_sampling: str = choice(TimestepSampling.uniform)
    variance_type: str = choice(VarianceType.fixed_small)
    vlb_weight: float = 0.001
    # Resolution shift (simple diffusion): SNR(t) is divided by resolution_shift**2, e.g. 2.0 when
    # training at twice the resolution the schedule was tuned for. 1.0 leaves the schedule as is.
    resolution_shift: float = 1.0
    # EDM preconditioning (Karras et al. 2022): the network output F gives
    # x0 = c_skip(σ) x + c_out(σ) F(c_in(σ) x). Needs prediction_type 'sample' and fixed variance.
    edm_preconditioning: bool = False
    sigma_data: float = 0.5

    @staticmethod
    def check(diff: DictConfig, cfg: DictConfig) -> None:
        require(diff.num_train_timesteps > 1, "diffusion.num_train_timesteps must be > 1.")
        require(
            diff.beta_schedule != BetaSchedule.custom or len(diff.betas) > 1,
            "diffusion.beta_schedule is 'custom' but diffusion.betas lists no values.",
        )
        require(
            diff.beta_schedule != BetaSchedule.custom or len(diff.betas) == diff.num_train_timesteps,
            f"diffusion.betas lists {len(diff.betas)} values but diffusion.num_train_timesteps is "
            f"{diff.num_train_timesteps}; make them equal.",
        )
        require(all(0.0 < b <= 1.0 for b in diff.betas), "diffusion.betas must all lie in (0, 1].")
        require(
            0.0 < diff.beta_start <= diff.beta_end < 1.0,
            "diffusion.beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1.",
        )
        require(diff.snr_gamma > 0, f"diffusion.snr_gamma must be positive, got {diff.snr_gamma}.")
        require(diff.noise_offset >= 0, f"diffusion.noise_offset must be >= 0, got {diff.noise_offset}.")
        require(diff.vlb_weight >= 0, f"diffusion.vlb_weight must be >= 0, got {diff.vlb_weight}.")
        require(
            diff.resolution_shift > 0,
            f"diffusion.resolution_shift must be positive, got {diff.resolution_shift}.",
        )
        require(diff.sigma_data > 0, f"diffusion.sigma_data must be positive, got {diff.sigma_data}.")
        require(
            not diff.edm_preconditioning or diff.prediction_type == PredictionType.sample,
            "diffusion.edm_preconditioning needs diffusion.prediction_type=sample (the preconditioned "
            "network predicts x0).",
        )
        require(
            not diff.edm_preconditioning or diff.variance_type != VarianceType.learned_range,
            "diffusion.edm_preconditioning cannot be combined with variance_type=learned_range.",
        )


@dataclass
class SamplingConfig(SamplingOptions):
    """Sampler defaults for validation grids and ``mmdiff sample``: the :class:`SamplingOptions`
    plus what only training previews use."""

    prompts: List[str] = field(default_factory=list)
    seed: int = 0
    every_n_steps: int = 500
    # text_to_image previews: one grid per size, "WIDTHxHEIGHT" or [WIDTH, HEIGHT] (config/image_sizes.py;
    # empty: one grid at data.image_size square).
    sizes: List[Any] = field(default_factory=list)

    @staticmethod
    def check(s: DictConfig, cfg: DictConfig) -> None:
        try:
            SamplingOptions.from_mapping(s).validate(cfg.diffusion.num_train_timesteps, prefix="sampling.")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        require(not s.sizes or cfg.system == "text_to_image",
                f"sampling.sizes is for text_to_image previews; system '{cfg.system}' samples no images: remove it.")
        sizes = parse_sizes(s.sizes, "sampling.sizes")
        multiple = built_size_multiple(cfg)
        for width, height in sizes if multiple is not None else ():
            problem = sample_size_problem(int(width), int(height), multiple)
            require(problem is None, f"sampling.sizes: {problem}")
        require(
            s.every_n_steps >= 0,
            f"sampling.every_n_steps must be >= 0 (0 = previews only at the start and end), got {s.every_n_steps}.",
        )


def sample_size_problem(width: int, height: int, multiple: int) -> Optional[str]:
    """Why a ``width``×``height`` image cannot be sampled by a model whose sides must be multiples
    of ``multiple`` pixels (the VAE's down-sampling × the U-Net's), or None."""
    for name, value in (("width", width), ("height", height)):
        if value < 1 or value % multiple:
            below = max(multiple, value - value % multiple)
            return (f"{name} {value} is not a positive multiple of {multiple} (the VAE's × the U-Net's "
                    f"down-sampling); use e.g. {below} or {below + multiple}.")
    return None


def built_size_multiple(cfg: DictConfig) -> Optional[int]:
    """The pixel multiple every sampled side must be of, for a VAE and U-Net built from the config;
    None when either comes from a file (the system checks then, once built)."""
    m = cfg.model
    if m.get("pretrained") is not None or m.vae.pretrained is not None or m.unet.pretrained is not None:
        return None
    return 2 ** (len(m.vae.block_out_channels) - 1) * 2 ** (len(m.unet.down_block_types) - 1)
