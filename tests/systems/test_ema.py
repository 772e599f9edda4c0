"""EMA callback: exactly one update per optimiser step, also with gradient accumulation and resume."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmdiff.callbacks.ema import EMACallback


class _Linear(L.LightningModule):
    """A linear regression with an ``ema_target``; records its weights after every optimiser step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)
        self.after_steps: List[torch.Tensor] = []

    @property
    def ema_target(self) -> nn.Module:
        return self.net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x).squeeze(1) - y).pow(2).mean()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_steps.append(torch.cat([p.detach().flatten() for p in self.net.parameters()]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=4)


def _fit(max_steps: int, ema: EMACallback, ckpt: Optional[Path] = None, save: Optional[Path] = None) -> _Linear:
    L.seed_everything(0, verbose=False)
    module = _Linear()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ema])
    trainer.fit(module, _data(), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return module


def _expected_shadow(start: torch.Tensor, after_steps: List[torch.Tensor], decay: float,
                     first_update: int = 1) -> torch.Tensor:
    """The EMA of ``after_steps`` from ``start``, one warm-up update per optimiser step."""
    shadow = start.clone()
    for n, weights in enumerate(after_steps, start=first_update):
        d = min(decay, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * weights
    return shadow


def _flat(ema: EMACallback) -> torch.Tensor:
    assert ema.shadow is not None
    return torch.cat([s.flatten() for s in ema.shadow])


def test_one_update_per_optimizer_step_with_accumulation() -> None:
    L.seed_everything(0, verbose=False)
    start = torch.cat([p.detach().flatten() for p in _Linear().net.parameters()])
    ema = EMACallback(decay=0.9)
    module = _fit(3, ema)
    assert ema.num_updates == 3
    assert torch.allclose(_flat(ema), _expected_shadow(start, module.after_steps, 0.9), atol=1e-6)


def test_resume_with_accumulation_takes_one_update_per_step(tmp_path: Path) -> None:
    ckpt = tmp_path / "half.ckpt"
    half = EMACallback(decay=0.9)
    _fit(2, half, save=ckpt)
    resumed = EMACallback(decay=0.9)
    module = _fit(4, resumed, ckpt=ckpt)
    assert len(module.after_steps) == 2
    assert resumed.num_updates == 4
    expected = _expected_shadow(_flat(half), module.after_steps, 0.9, first_update=3)
    assert torch.allclose(_flat(resumed), expected, atol=1e-6)
