"""PSNR / SSIM on [-1, 1] image batches."""
from __future__ import annotations

import math

import pytest
import torch

from mmdiff.eval.image_metrics import psnr, ssim


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images so SSIM is meaningful
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 2 - 1


def test_identical_images_score_perfectly() -> None:
    x = _images()
    assert math.isinf(float(psnr(x, x)))
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_noise_lowers_both_and_more_noise_lowers_more() -> None:
    x = _images()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    little, lots = (x + 0.05 * noise).clamp(-1, 1), (x + 0.3 * noise).clamp(-1, 1)
    assert 20 < float(psnr(little, x)) < 40
    assert float(psnr(lots, x)) < float(psnr(little, x))
    assert float(ssim(lots, x)) < float(ssim(little, x)) < 1.0


def test_psnr_is_the_mean_of_per_image_values_with_range_two() -> None:
    x = _images(2)
    y = x.clone()
    y[0] += 0.1  # mse 0.01 on image 0
    y[1] -= 0.2  # mse 0.04 on image 1
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2
    assert float(psnr(y, x)) == pytest.approx(expected, rel=1e-4)
    assert float(ssim(x[:1], y[:1])) == pytest.approx(float(ssim(x[:1], y[:1], data_range=2.0)))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 8))
