"""Sampling options: one torch-free dataclass for the ``sampling:`` config section, the CLI's sampler
flags and :meth:`mmdiff.diffusion.GaussianDiffusion.sample`.

A new sampler option is one field below (default, help, range); the config key, the CLI flag and its
range check follow from it, and ``GaussianDiffusion.sample`` reads it from ``options``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

#: Sampler name → (its step function in :mod:`mmdiff.diffusion.samplers`, the kind of timestep/σ grid it
#: runs on, see :func:`mmdiff.diffusion.spacing.make_grid`). The one list of sampler names.
SAMPLER_TABLE: Dict[str, Tuple[str, str]] = {
    "ddpm": ("ddpm", "discrete"),
    "ddim": ("ddim", "discrete"),
    "euler": ("euler", "euler"),
    "euler_karras": ("euler", "euler_karras"),
    "heun": ("heun", "euler_karras"),
    "dpmpp_2m": ("dpmpp_2m", "dpm"),
    "dpmpp_2m_karras": ("dpmpp_2m", "dpm_karras"),
}
SAMPLER_GRIDS: Dict[str, str] = {name: grid for name, (_, grid) in SAMPLER_TABLE.items()}
SAMPLER_NAMES: Tuple[str, ...] = tuple(SAMPLER_TABLE)
#: Samplers whose every step is a single network evaluation from one level to the next (RePaint
#: resampling re-runs one step at a time, which multistep solvers cannot).
SINGLE_STEP_SAMPLERS: Tuple[str, ...] = ("ddpm", "ddim", "euler", "euler_karras", "heun")
#: How inference timesteps are spread over the training ones (:mod:`mmdiff.diffusion.spacing`).
TIMESTEP_SPACINGS: Tuple[str, ...] = ("linspace", "leading", "trailing")

# A range rule: (accepts the value, what the value must be).
Rule = Tuple[Callable[[Any], bool], str]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


AT_LEAST_ZERO: Rule = (lambda v: _number(v) and v >= 0, "must be >= 0")
WHOLE_AT_LEAST_ZERO: Rule = (lambda v: _whole(v) and v >= 0, "must be a whole number >= 0")
POSITIVE: Rule = (lambda v: _number(v) and v > 0, "must be positive")
POSITIVE_OR_NULL: Rule = (lambda v: v is None or (_number(v) and v > 0), "must be positive or null")
POSITIVE_WHOLE: Rule = (lambda v: _whole(v) and v > 0, "must be a positive whole number")
UNIT_INTERVAL: Rule = (lambda v: _number(v) and 0.0 <= v <= 1.0, "must be in [0, 1]")
BOOLEAN: Rule = (lambda v: isinstance(v, bool), "must be true or false")
UNIT_FRACTION: Rule = (lambda v: _number(v) and 0.0 < v <= 1.0, "must be in (0, 1]")


def option(default: Any, help: str, rule: Optional[Rule] = None, choices: Tuple[str, ...] = (),
           flags: Tuple[str, ...] = (), cli_default: Any = None) -> Any:
    """A dataclass field carrying what the checks and the CLI need: its help text, its range
    ``rule`` or ``choices``, extra CLI ``flags`` (aliases) and the CLI's default (None: the config's)."""
    meta = {"help": help, "rule": rule, "choices": choices, "flags": flags, "cli_default": cli_default}
    return field(default=default, metadata=meta)


@dataclass
class SamplingOptions:
    """How :meth:`GaussianDiffusion.sample` draws samples (see :mod:`mmdiff.diffusion.samplers`)."""

    sampler: str = option("ddim", "sampler", choices=SAMPLER_NAMES)
    steps: int = option(50, "sampler steps", POSITIVE_WHOLE, cli_default=50)
    guidance_scale: float = option(4.0, "classifier-free guidance scale (1 = no guidance)", AT_LEAST_ZERO,
                                   flags=("--cfg",))
    guidance_rescale: float = option(0.0, "rescale of the guided prediction's std (Lin et al. 2023)", UNIT_INTERVAL)
    eta: float = option(0.0, "DDIM eta (0 = deterministic)", AT_LEAST_ZERO)
    temperature: float = option(1.0, "scale of the noise DDPM, DDIM (eta > 0) and the corrector inject", AT_LEAST_ZERO)
    timestep_spacing: str = option("leading", "spread of the timesteps", choices=TIMESTEP_SPACINGS)
    # Added to 'leading' timesteps only (diffusers' steps_offset; Stable Diffusion uses 1).
    steps_offset: int = option(0, "offset added to 'leading' timesteps", WHOLE_AT_LEAST_ZERO)
    # DDIM's last step lands on the clean ᾱ = 1 (true), or on ᾱ of timestep 0 (false: diffusers'
    # set_alpha_to_one=False, as Stable Diffusion's scheduler configs have it). Other samplers end clean.
    set_alpha_to_one: bool = option(True, "DDIM: the last step ends at alpha_bar 1 (false: at timestep 0's)", BOOLEAN)
    # Langevin corrector steps after each sampler step (predictor-corrector) and their target SNR.
    corrector_steps: int = option(0, "Langevin corrector steps after each step", WHOLE_AT_LEAST_ZERO)
    snr: float = option(0.16, "the corrector's target signal-to-noise ratio", POSITIVE)
    # img2img: fraction of the schedule re-run from a noised init image (1.0 = from pure noise).
    strength: float = option(1.0, "img2img: share of the schedule re-run from the noised init image", UNIT_FRACTION)
    # Clamp the x0 estimate to [-v, v] at every step (pixel-space models); None = no clamping.
    clip_denoised: Optional[float] = option(None, "clamp the x0 estimate to [-v, v] at every step", POSITIVE_OR_NULL)
    # Inpainting: RePaint resampling, each step redone this many more times (single-step samplers).
    resample_steps: int = option(0, "inpainting: RePaint re-runs of each step", WHOLE_AT_LEAST_ZERO)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SamplingOptions":
        """The options among ``values`` (e.g. the ``sampling:`` config section; other keys ignored)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def replace(self, **changes: Any) -> "SamplingOptions":
        """A copy with ``changes`` applied; None values leave an option as it is."""
        names = option_names()
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"unknown sampling option '{unknown[0]}'; choose from: {', '.join(names)}.")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validate(self, num_train_timesteps: Optional[int] = None, prefix: str = "") -> None:
        """Raise ``ValueError`` (one sentence naming ``prefix + option``) on the first bad option;
        with ``num_train_timesteps``, ``steps`` must not exceed it."""
        n = num_train_timesteps
        if n is not None and not (_whole(self.steps) and 1 <= self.steps <= n):
            raise ValueError(f"{prefix}steps must be between 1 and the {n} training timesteps, got {self.steps}.")
        for name in option_names():
            problem = option_problem(name, getattr(self, name), prefix + name)
            if problem:
                raise ValueError(problem)
        if self.resample_steps and self.sampler not in SINGLE_STEP_SAMPLERS:
            raise ValueError(
                f"{prefix}resample_steps needs a single-step sampler ({', '.join(SINGLE_STEP_SAMPLERS)}), "
                f"not '{self.sampler}'."
            )


def option_names() -> Tuple[str, ...]:
    """The sampling options' names, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(SamplingOptions))


def option_fields() -> Iterator[dataclasses.Field]:
    """The options' dataclass fields (with their ``help``, ``rule``, ``choices`` ... metadata)."""
    return iter(dataclasses.fields(SamplingOptions))


def option_problem(name: str, value: Any, shown: Optional[str] = None) -> Optional[str]:
    """One sentence on why ``value`` is no valid option ``name`` (called ``shown``), or None."""
    meta = SamplingOptions.__dataclass_fields__[name].metadata
    shown = shown or name
    if meta["choices"] and value not in meta["choices"]:
        return f"unknown {shown} '{value}'; choose one of: {', '.join(meta['choices'])}."
    rule = meta["rule"]
    if rule is not None and not rule[0](value):
        return f"{shown} {rule[1]}, got {value}."
    return None


__all__ = [
    "SamplingOptions",
    "SAMPLER_NAMES",
    "SAMPLER_GRIDS",
    "SAMPLER_TABLE",
    "SINGLE_STEP_SAMPLERS",
    "TIMESTEP_SPACINGS",
    "option",
    "option_names",
    "option_fields",
    "option_problem",
]
