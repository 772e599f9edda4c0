"""Starting models from files made elsewhere: diffusers folders, SD single-file U-Nets, ignore_keys."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from mmdiff.errors import CheckpointError
from mmdiff.models.unet import build_unet
from mmdiff.models.vae import build_vae

from interopkit import tiny_config
from ldm_layout import unet_to_ldm


def test_diffusers_vae_folder_reproduces_encode_decode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                           scaling_factor=0.3).eval()
    theirs.save_pretrained(tmp_path / "vae")
    cfg = tiny_config().model.vae
    cfg.pretrained = str(tmp_path / "vae")
    ours = build_vae(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_theirs, z_ours = theirs.encode(x).latent_dist.mean, ours.encode(x).latent_dist.mean
        assert torch.equal(z_ours, z_theirs)
        assert torch.equal(ours.decode(z_ours).sample, theirs.decode(z_theirs).sample)
    assert ours.config.scaling_factor == 0.3


def _unet_cfg():
    cfg = tiny_config().model.unet
    return cfg


def _build(cfg):
    return build_unet(cfg, latent_channels=4, sample_size=4, cross_attention_dim=64, pooled_dim=64)


@pytest.mark.parametrize("linear", [False, True], ids=["sd1-conv-proj", "sd2-linear-proj"])
def test_sd_single_file_unet_converts_and_matches(tmp_path: Path, linear: bool) -> None:
    cfg = _unet_cfg()
    cfg.use_linear_projection = linear
    torch.manual_seed(0)
    source = _build(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ldm = unet_to_ldm(source.state_dict(), source.config)
    assert not any(".resnets." in k or "down_blocks" in k for k in ldm)
    torch.save({"state_dict": {**ldm, "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}},
               tmp_path / "sd.ckpt")
    cfg.pretrained = str(tmp_path / "sd.ckpt")
    loaded = _build(cfg)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, ctx, pooled = torch.randn(2, 4, 4, 4), torch.randn(2, 32, 64), torch.randn(2, 64)
    with torch.no_grad():
        a = source(x, 10, encoder_hidden_states=ctx, class_labels=pooled).sample
        b = loaded(x, 10, encoder_hidden_states=ctx, class_labels=pooled).sample
    assert torch.equal(a, b)
    assert loaded.down_blocks[0].attentions[0].proj_in.weight.ndim == (2 if linear else 4)
    cfg.use_linear_projection = not linear
    with pytest.raises(CheckpointError, match=f"use_linear_projection: {str(linear).lower()}"):
        _build(cfg)


def test_strict_load_reports_keys_and_ignore_keys_lets_listed_ones_through(tmp_path: Path) -> None:
    cfg = _unet_cfg()
    state = {k: v.clone() for k, v in _build(cfg).state_dict().items()}
    del state["conv_out.bias"]
    state["extra.lora_up.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "unet.safetensors"))
    cfg.pretrained = str(tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError) as err:
        _build(cfg)
    assert "missing key(s) (conv_out.bias)" in str(err.value) and "extra.lora_up.weight" in str(err.value)
    cfg.ignore_keys = ["conv_out.bias", "extra.*"]
    assert _build(cfg).conv_out.bias.shape == (4,)
