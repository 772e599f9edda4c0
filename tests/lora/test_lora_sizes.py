"""How much a LoRA checkpoint holds against the full U-Net: SD-1.5's U-Net counted on the meta
device (nothing allocated) at ranks 4 and 64, with diffusers' default targets."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from mmdiff.models.lora import add_unet_lora, parameter_counts

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.mark.parametrize("rank, expected", [(4, 797_184), (64, 12_754_944)])
def test_sd15_unet_lora_parameter_counts(rank: int, expected: int) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    add_unet_lora(unet, rank)
    counts = parameter_counts(unet)
    assert counts["base"] == 859_520_964  # SD-1.5's U-Net
    share = counts["adapter"] / counts["base"]
    print(f"SD-1.5 U-Net, rank {rank}: {counts['adapter']:,} adapter parameters "
          f"({counts['adapter'] * 4 / 2**20:.1f} MiB fp32) vs {counts['base']:,} "
          f"({counts['base'] * 4 / 2**20:.0f} MiB fp32): {share:.2%}")
    assert counts["adapter"] == expected
