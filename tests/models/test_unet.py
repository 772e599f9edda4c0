"""U-Net: tiny build, conditioning paths, learned variance, loading and its errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from mmdiff.config import UNetConfig
from mmdiff.errors import CheckpointError, ConfigError
from mmdiff.models.unet import build_unet, uses_pooled_text


def unet_cfg(**overrides) -> DictConfig:
    cfg = OmegaConf.structured(UNetConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _inputs(batch: int = 2, channels: int = 4, size: int = 8, width: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.tensor([3, 700][:batch])
    ctx = torch.randn(batch, 5, width, generator=g)
    return x, t, ctx


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(unet_cfg(), latent_channels=4, sample_size=8, cross_attention_dim=64)


def test_default_tiny_unet_shapes_and_head_dim(unet) -> None:
    x, t, ctx = _inputs()
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=ctx).sample
    assert out.shape == x.shape
    assert not uses_pooled_text(unet)
    # attention_head_dim = channels per head: 64 channels / 8 = 8 heads, 128 / 8 = 16 heads
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert attn.heads == 8 and attn.inner_dim // attn.heads == 8
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 16


def test_pooled_text_learned_variance_and_cross_attention_override() -> None:
    cfg = unet_cfg(use_pooled_text=True, cross_attention_dim=32)
    unet = build_unet(cfg, 4, 8, cross_attention_dim=64, pooled_dim=16, learned_variance=True)
    assert uses_pooled_text(unet)
    x, t, ctx = _inputs()
    pooled = torch.randn(2, 16)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=ctx, class_labels=pooled).sample
        other = unet(x, t, encoder_hidden_states=ctx, class_labels=-pooled).sample
    assert out.shape == (2, 8, 8, 8)
    assert not torch.allclose(out, other)  # the pooled embedding changes the output
    assert unet.encoder_hid_proj.in_features == 64 and unet.encoder_hid_proj.out_features == 32
    with pytest.raises(ConfigError, match="no pooled embedding"):
        build_unet(unet_cfg(use_pooled_text=True), 4, 8, cross_attention_dim=64)
    with pytest.raises(ConfigError, match="divisible by model.unet.attention_head_dim"):
        build_unet(unet_cfg(attention_head_dim=48), 4, 8, cross_attention_dim=64)


def test_roundtrip_through_folder_and_safetensors(unet, tmp_path: Path) -> None:
    x, t, ctx = _inputs()
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=ctx).sample
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    save_file(unet.state_dict(), tmp_path / "unet.safetensors")
    torch.save({"state_dict": {f"unet.{k}": v for k, v in unet.state_dict().items()}}, tmp_path / "t2i.ckpt")
    for source in ("pipe", "pipe/unet", "unet.safetensors", "t2i.ckpt"):
        loaded = build_unet(unet_cfg(pretrained=str(tmp_path / source)), 4, 8, cross_attention_dim=64)
        with torch.no_grad():
            assert torch.equal(loaded(x, t, encoder_hidden_states=ctx).sample, expected), source


def test_loading_errors_are_one_sentence(unet, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="do not exist") as err:
        build_unet(unet_cfg(pretrained=str(missing)), 4, 8, cross_attention_dim=64)
    assert str(missing) in str(err.value)
    unet.save_pretrained(tmp_path / "u")
    with pytest.raises(CheckpointError, match="maps 4→4 channels but this model needs 8→8"):
        build_unet(unet_cfg(pretrained=str(tmp_path / "u")), 8, 8, cross_attention_dim=64)
    with pytest.raises(CheckpointError, match="text states of width 64"):
        build_unet(unet_cfg(pretrained=str(tmp_path / "u")), 4, 8, cross_attention_dim=32)
    save_file(unet.state_dict(), tmp_path / "u.safetensors")
    with pytest.raises(CheckpointError, match="U-Net .* weights do not fit the model") as err:
        build_unet(
            unet_cfg(pretrained=str(tmp_path / "u.safetensors"), block_out_channels=[32, 64]),
            4, 8, cross_attention_dim=64,
        )
    assert "\n" not in str(err.value)


def test_one_channel_groups_warn_that_the_time_embedding_is_lost(caplog) -> None:
    """32 groups at width 32 normalise each channel alone, cancelling the added time embedding."""
    cfg = unet_cfg(block_out_channels=[32, 64], attention_head_dim=32)
    with caplog.at_level("WARNING", logger="mmdiff.models.unet"):
        unet = build_unet(cfg, latent_channels=4, sample_size=8, cross_attention_dim=64)
    assert "time embedding has no effect" in caplog.text and "[32]" in caplog.text
    x, _, ctx = _inputs()
    with torch.no_grad():  # the reason for the warning: at that level the timestep changes nothing
        block = unet.down_blocks[0].resnets[0]
        h = unet.conv_in(x)
        temb = unet.time_embedding(unet.time_proj(torch.tensor([3, 3])))
        a = block(h, temb)
        b = block(h, temb + torch.randn_like(temb))
    assert torch.allclose(a, b, atol=1e-5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmdiff.models.unet"):
        build_unet(unet_cfg(block_out_channels=[32, 64], attention_head_dim=32, norm_num_groups=8),
                   latent_channels=4, sample_size=8, cross_attention_dim=64)
    assert "time embedding" not in caplog.text
