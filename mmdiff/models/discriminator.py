"""PatchGAN discriminator (pix2pix / taming-transformers) for adversarial VAE training."""
from __future__ import annotations

import math

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: no running statistics to synchronise across ranks.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """Scores overlapping patches real (> 0) or fake (< 0); output B×1×h×w logits.

    ``n_layers`` stride-2 convolutions (channels doubling up to 8× ``channels``), then two
    stride-1 convolutions; a 32×32 input with ``n_layers=3`` gives 2×2 patch logits.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=2, padding=1, bias=False),
                _norm(channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(channels * prev, channels * mult, 4, stride=1, padding=1, bias=False),
            _norm(channels * mult),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1),
        ]
        self.net = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


__all__ = ["PatchDiscriminator", "hinge_d_loss"]
