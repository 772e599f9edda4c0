"""Pieces every system shares: AdamW with warm-up + cosine/constant LR, config round-trip."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable

import torch
from omegaconf import DictConfig

from mmdiff.config import LRSchedule


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier at ``step``: linear warm-up, then constant or cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == LRSchedule.constant.value:
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def configure_adamw(
    params: Iterable[torch.nn.Parameter], optim: DictConfig, max_steps: int
) -> Dict[str, Any]:
    """AdamW + per-step LambdaLR, in the dict form ``configure_optimizers`` returns."""
    opt = torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    schedule = optim.schedule.value if hasattr(optim.schedule, "value") else str(optim.schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda step: lr_lambda(step, optim.warmup_steps, max_steps, schedule, optim.min_lr_ratio),
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
