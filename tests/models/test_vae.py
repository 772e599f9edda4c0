"""VAE: build from the tiny config, load from folders / safetensors / CompVis layout, helpers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from mmdiff.config import VAEConfig
from mmdiff.errors import CheckpointError
from mmdiff.models.vae import build_vae, estimate_scaling_factor, vae_downsample_factor


def vae_cfg(**overrides) -> DictConfig:
    cfg = OmegaConf.structured(VAEConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@torch.no_grad()
def _roundtrip(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(x).latent_dist.mode()).sample


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae(vae_cfg())


def test_default_tiny_vae_shapes(vae) -> None:
    x = _images()
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        assert dist.mean.shape == (2, 4, 16, 16)
        assert vae.decode(dist.sample()).sample.shape == x.shape
    assert vae.config.block_out_channels == (32, 64) or list(vae.config.block_out_channels) == [32, 64]
    assert vae.config.scaling_factor == 1.0  # unknown until estimated
    assert not vae.training


def test_downsample_factor_and_depth() -> None:
    assert vae_downsample_factor(vae_cfg()) == 2
    deeper = vae_cfg(block_out_channels=[32, 64, 64], scaling_factor=0.5)
    assert vae_downsample_factor(deeper) == 4
    built = build_vae(deeper)
    assert vae_downsample_factor(built) == 4
    assert built.config.scaling_factor == 0.5
    with torch.no_grad():
        assert built.encode(_images(1)).latent_dist.mean.shape == (1, 4, 8, 8)


def test_roundtrip_through_folder_pipeline_folder_and_safetensors(vae, tmp_path: Path) -> None:
    x = _images()
    expected = _roundtrip(vae, x)
    vae.save_pretrained(tmp_path / "folder")
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    for source in ("folder", "pipeline", "vae.safetensors"):
        loaded = build_vae(vae_cfg(pretrained=str(tmp_path / source)))
        assert torch.equal(_roundtrip(loaded, x), expected), source
    assert vae_downsample_factor(vae_cfg(pretrained=str(tmp_path / "folder"), block_out_channels=[8])) == 2


def _to_compvis(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys → the original CompVis/SD ``first_stage_model.`` layout."""
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.", k)
        k = re.sub(r"down_blocks\.(\d+)\.", r"down.\1.", k)
        k = k.replace(".resnets.", ".block.").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("downsamplers.0.", "downsample.").replace("upsamplers.0.", "upsample.")
        k = re.sub(r"mid_block\.block\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        k = k.replace("attn_1.group_norm", "attn_1.norm").replace("to_out.0", "proj_out")
        k = re.sub(r"attn_1\.to_([qkv])\.", r"attn_1.\1.", k)
        k = k.replace("conv_norm_out", "norm_out")
        if "attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # CompVis attention projections are 1×1 convs
        out["first_stage_model." + k] = value
    out["model.diffusion_model.dummy"] = torch.zeros(1)  # a full SD checkpoint has more
    return out


def test_compvis_layout_safetensors_is_converted(vae, tmp_path: Path) -> None:
    compvis = _to_compvis(vae.state_dict(), len(vae.config.block_out_channels))
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in compvis
    save_file(compvis, tmp_path / "sd.safetensors")
    loaded = build_vae(vae_cfg(pretrained=str(tmp_path / "sd.safetensors")))
    x = _images()
    assert torch.equal(_roundtrip(loaded, x), _roundtrip(vae, x))


def test_missing_and_mismatched_weights_are_one_sentence(vae, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.safetensors"
    with pytest.raises(CheckpointError) as err:
        build_vae(vae_cfg(pretrained=str(missing)))
    assert str(err.value).startswith(f"VAE weights '{missing}' do not exist; set model.vae.pretrained")
    save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="missing key.*shape mismatch") as err:
        build_vae(vae_cfg(pretrained=str(tmp_path / "vae.safetensors"), block_out_channels=[32, 64, 64]))
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a loadable diffusers AutoencoderKL folder"):
        build_vae(vae_cfg(pretrained=str(tmp_path / "empty")))


def test_estimate_scaling_factor(vae) -> None:
    batches = [{"image": _images(2)}, {"image": _images(2)}, {"image": _images(2)}]
    scale = estimate_scaling_factor(vae, batches, n_batches=2)
    with torch.no_grad():
        z = torch.cat([vae.encode(b["image"]).latent_dist.mean for b in batches[:2]])
    assert estimate_scaling_factor(vae, batches, n_batches=2, use_mean=True) == pytest.approx(
        1.0 / z.double().std(unbiased=False).item(), rel=1e-6
    )
    assert 0 < scale < float("inf")
    with pytest.raises(ValueError, match="no batches"):
        estimate_scaling_factor(vae, [], n_batches=2)


def test_estimate_scaling_factor_makes_no_float64_on_the_device(vae) -> None:
    import copy
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from accelerator_sim import Float64OnDevice

    on_meta = copy.deepcopy(vae).to("meta")  # meta stands in for MPS/CUDA
    with Float64OnDevice() as guard, torch.no_grad():
        estimate_scaling_factor(on_meta, [{"image": _images(2).to("meta")}], n_batches=1, use_mean=True)
    assert guard.made == []
