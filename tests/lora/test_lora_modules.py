"""models/lora on a bare open_clip text tower: out_proj adapters take effect (a stock
nn.MultiheadAttention would ignore them), scale 0 is the base exactly, merging keeps the output."""
from __future__ import annotations

import open_clip
import pytest
import torch

from mmdiff.models.lora import add_text_lora, lora_parameters, merge_lora, parameter_counts, set_lora_scale


def _clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, patch_size=8,
                                                                            image_size=16, head_width=16),
                          text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2,
                                                         layers=2)).eval()


@pytest.mark.parametrize("targets", [["out_proj"], ["c_fc", "c_proj"]])
@torch.no_grad()
def test_text_adapters_change_the_output_and_scale_zero_is_the_base(targets) -> None:
    clip = _clip().requires_grad_(False)
    tokens = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    base = clip.encode_text(tokens)
    add_text_lora(clip, rank=4, targets=targets)
    params = lora_parameters(clip)
    assert params and all(p.requires_grad for p in params)
    assert parameter_counts(clip)["adapter"] == sum(p.numel() for p in params)
    for p in params:
        p.normal_(0, 0.1)
    adapted = clip.encode_text(tokens)
    assert float((adapted - base).abs().max()) > 1e-3
    with set_lora_scale(clip, 0.0):
        assert torch.equal(clip.encode_text(tokens), base)
    assert torch.equal(clip.encode_text(tokens), adapted)  # the scale is restored after the block
    merged = merge_lora(clip)
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    assert float((merged.encode_text(tokens) - adapted).abs().max()) <= 1e-5
