"""The ``trainer:``, ``logger:`` and ``optim:`` sections and the names Lightning accepts for them."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from mmdiff.config.fields import choice, require


class LoggerKind(str, enum.Enum):
    wandb = "wandb"
    csv = "csv"
    none = "none"


class WandbMode(str, enum.Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class CheckpointUpload(str, enum.Enum):
    """Which checkpoints ``logger.log_checkpoints`` uploads to W&B as artifacts."""

    none = "none"
    last = "last"
    all = "all"


class LRSchedule(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"


class FSDPSharding(str, enum.Enum):
    full = "full"
    hybrid = "hybrid"


# trainer.accelerator / trainer.precision values Lightning knows (checked here so that a typo fails
# before anything is built; tests/test_config.py compares them with Lightning's registries).
ACCELERATOR_NAMES = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
PRECISION_NAMES = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64",
                   "bf16", "16", "transformer-engine", "transformer-engine-float16")

# Precisions that train under fp16 autocast with a GradScaler.
FP16_SCALED = ("16-mixed", "16")

# Precisions that cast every weight (frozen encoders included) while the systems keep latents,
# context and losses in float32: the first convolution would fail on mixed dtypes.
WHOLE_MODEL_PRECISIONS = ("bf16-true", "16-true", "64-true", "64")

# The names trainer.strategy accepts (mmdiff.run.strategies builds each).
STRATEGY_NAMES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp")


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
    fsdp_sharding: str = choice(FSDPSharding.full)
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
    # On SIGTERM (preemption, `scontrol requeue`, scancel) save RUN_DIR/hpc_ckpt_N.ckpt at the next
    # optimiser-step boundary, then exit 143; false = stop after the current batch without saving.
    # The save must fit in the time the sender grants before SIGKILL (SLURM: KillWait, default 30 s).
    sigterm_save: bool = True

    @staticmethod
    def check(t: DictConfig, cfg: DictConfig) -> None:
        require(t.max_steps > 0, f"trainer.max_steps must be positive, got {t.max_steps}.")
        require(
            t.probe_resources_every_n_steps >= 0,
            f"trainer.probe_resources_every_n_steps must be >= 0, got {t.probe_resources_every_n_steps}.",
        )
        require(t.max_bad_steps > 0, f"trainer.max_bad_steps must be positive, got {t.max_bad_steps}.")
        require(
            t.keep_last_n >= -1,
            f"trainer.keep_last_n must be -1 (keep all), 0 (only last.ckpt) or positive, got {t.keep_last_n}.",
        )
        require(t.num_nodes > 0, f"trainer.num_nodes must be positive, got {t.num_nodes}.")
        require(
            str(t.accelerator) in ACCELERATOR_NAMES,
            f"unknown trainer.accelerator '{t.accelerator}'; choose one of: {', '.join(ACCELERATOR_NAMES)}.",
        )
        require(
            str(t.devices) == "auto" or re.fullmatch(r"-1|[1-9][0-9]*|[0-9]+(,[0-9]*)+", str(t.devices)) is not None,
            f"trainer.devices must be 'auto', a positive count, -1 (all) or a list like '0,1', got '{t.devices}'.",
        )
        require(
            str(t.precision) in PRECISION_NAMES,
            f"unknown trainer.precision '{t.precision}'; choose one of: {', '.join(PRECISION_NAMES)}.",
        )
        require(
            str(t.precision) not in WHOLE_MODEL_PRECISIONS,
            f"trainer.precision={t.precision} is not supported (it casts every weight, while mmdiff keeps "
            "latents, conditioning and losses in float32); use bf16-mixed, 16-mixed or 32-true.",
        )
        require(t.gradient_clip_val >= 0, f"trainer.gradient_clip_val must be >= 0 (0 = off), got {t.gradient_clip_val}.")
        require(
            not (t.fused_adamw is True and str(t.precision) in FP16_SCALED and t.gradient_clip_val > 0),
            "trainer.fused_adamw=true cannot clip gradients under fp16's GradScaler (it unscales inside "
            "its step); use trainer.precision=bf16-mixed, trainer.gradient_clip_val=0 or trainer.fused_adamw=null.",
        )
        for key in ("accumulate_grad_batches", "val_every_n_steps", "log_every_n_steps", "checkpoint_every_n_steps"):
            require(t[key] > 0, f"trainer.{key} must be positive, got {t[key]}.")
        # Lightning steps the optimiser at every epoch end, so a pass that is not a whole number of
        # accumulation windows would take a short step and shift every step count after it.
        steps_per_epoch = cfg.data.steps_per_epoch
        require(
            steps_per_epoch % t.accumulate_grad_batches == 0,
            f"data.steps_per_epoch ({steps_per_epoch}) must be a multiple of trainer.accumulate_grad_batches "
            f"({t.accumulate_grad_batches}).",
        )
        require(
            t.limit_val_batches is None or t.limit_val_batches >= 0,
            f"trainer.limit_val_batches must be >= 0 or null, got {t.limit_val_batches}.",
        )
        require(
            str(t.strategy) in STRATEGY_NAMES,
            f"unknown trainer.strategy '{t.strategy}'; choose one of: {', '.join(STRATEGY_NAMES)}.",
        )


@dataclass
class LoggerConfig:
    """Weights & Biases (offline by default), CSV, or nothing."""

    kind: str = choice(LoggerKind.wandb)
    project: str = "mmdiff"
    mode: str = choice(WandbMode.offline)
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # W&B run group (null = the experiment's `name`): training and its `mmdiff eval` runs join it.
    group: Optional[str] = None
    # W&B job type of the training run (null = the system's name, e.g. text_to_image).
    job_type: Optional[str] = None
    # Checkpoints uploaded as W&B artifacts: none, last (last.ckpt once training ends, alias
    # `last`) or all (each periodic checkpoint as it is written, aliased by its step, plus last).
    log_checkpoints: str = choice(CheckpointUpload.none)

    @staticmethod
    def check(lg: DictConfig, cfg: DictConfig) -> None:
        if lg.kind == LoggerKind.wandb.value:
            return
        require(lg.log_checkpoints == CheckpointUpload.none.value,
                f"logger.log_checkpoints: {lg.log_checkpoints} needs logger.kind: wandb (it is {lg.kind}).")
        for key in ("group", "job_type"):
            require(lg[key] is None, f"logger.{key} is a W&B setting; it needs logger.kind: wandb (it is {lg.kind}).")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then constant or cosine decay."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = choice(LRSchedule.cosine)
    min_lr_ratio: float = 0.0
    # LR of the text encoder when it is trained (model.clip.freeze: false in text_to_image and
    # prior; its own AdamW parameter group, same schedule); null = optim.lr.
    text_encoder_lr: Optional[float] = None

    @staticmethod
    def check(o: DictConfig, cfg: DictConfig) -> None:
        require(o.lr > 0, f"optim.lr must be positive, got {o.lr}.")
        require(
            o.text_encoder_lr is None or o.text_encoder_lr > 0,
            f"optim.text_encoder_lr must be positive or null, got {o.text_encoder_lr}.",
        )
        require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
        require(
            len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
            f"optim.betas must hold two numbers in [0, 1), got {list(o.betas)}.",
        )
        require(o.eps > 0, f"optim.eps must be positive, got {o.eps}.")
        require(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
        require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
