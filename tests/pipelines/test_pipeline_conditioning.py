"""SDXL training conditioning: size/crop ids from the batch, zeros for dropped captions."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

from mmdiff.config import load_config
from mmdiff.errors import ConfigError
from mmdiff.systems.text_to_image import TextToImageSystem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_pipelines import pipeline_config  # noqa: E402


def test_batch_time_ids_and_dropped_captions(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    system = TextToImageSystem(load_config(pipeline_config(tmp_path, pipeline_folders["sdxl"])))
    images = torch.zeros(3, 3, 16, 24)
    batch = {"image": images, "caption": ["a", "b", "c"],
             "original_size": torch.tensor([[100, 80], [16, 24], [40, 60]]),
             "crop_top_left": torch.tensor([[3, 0], [0, 0], [0, 7]])}
    cond = system.batch_condition(batch, drop=torch.tensor([False, True, False]))
    want = torch.tensor([[100, 80, 3, 0, 16, 24], [16, 24, 0, 0, 16, 24], [40, 60, 0, 7, 16, 24]]).float()
    assert torch.equal(cond["time_ids"], want)
    assert not cond["context"][1].any() and not cond["pooled"][1].any()  # force_zeros_for_empty_prompt
    assert cond["context"][0].abs().sum() > 0 and cond["pooled"][2].abs().sum() > 0
    # Without the data's keys (before H6's sizes): original = target = the batch's size, no crop.
    plain = system.batch_condition({"image": images, "caption": ["a", "b", "c"]})
    assert torch.equal(plain["time_ids"], torch.tensor([[16, 24, 0, 0, 16, 24]] * 3).float())
    loss = system._loss(batch)["loss"]
    assert torch.isfinite(loss)


def test_sd_dropped_captions_use_the_empty_prompt(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    system = TextToImageSystem(load_config(pipeline_config(tmp_path, pipeline_folders["sd1"])))
    assert not system.micro_conditioning and not system.zero_empty_prompt
    cond = system.batch_condition({"caption": ["a", "b"]}, drop=torch.tensor([True, False]))
    assert "time_ids" not in cond
    assert torch.allclose(cond["context"][0], system.encode_prompts([""])["context"][0], atol=1e-6)


def test_micro_conditioning_dropout_gives_rows_the_default_ids(tmp_path: Path,
                                                               pipeline_folders: Dict[str, Path]) -> None:
    system = TextToImageSystem(load_config(pipeline_config(tmp_path, pipeline_folders["sdxl"]),
                                           ["model.micro_conditioning_dropout=0.5"]))
    batch = {"image": torch.zeros(2, 3, 16, 24), "caption": ["a", "b"],
             "original_size": torch.tensor([[100, 80], [40, 60]]), "crop_top_left": torch.tensor([[3, 0], [0, 7]])}
    cond = system.batch_condition(batch, size_drop=torch.tensor([True, False]))
    want = torch.tensor([[16, 24, 0, 0, 16, 24], [40, 60, 0, 7, 16, 24]]).float()
    assert torch.equal(cond["time_ids"], want)
    torch.manual_seed(0)
    assert torch.isfinite(system.training_step(batch, 0))


def test_micro_conditioning_dropout_needs_an_sdxl_unet(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    cfg = load_config(pipeline_config(tmp_path, pipeline_folders["sd1"]), ["model.micro_conditioning_dropout=0.1"])
    with pytest.raises(ConfigError, match="micro_conditioning_dropout is for SDXL"):
        TextToImageSystem(cfg)


def test_sdxl_samples_at_any_multiple_of_its_size_multiple(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    config = pipeline_config(tmp_path, pipeline_folders["sdxl"])
    system = TextToImageSystem(load_config(config))
    system.latent_scale.fill_(1.0)
    m = system.size_multiple
    assert m == system.vae_factor * 2 ** (len(system.unet.down_blocks) - 1)
    told = []
    denoise = system.denoise
    system.denoise = lambda x_t, t, cond: told.append(cond["time_ids"]) or denoise(x_t, t, cond)
    images = system.sample(["a"], width=2 * m, height=m, steps=1, guidance_scale=1.0)
    assert images.shape == (1, 3, m, 2 * m)
    assert told[0][0].tolist() == [m, 2 * m, 0, 0, m, 2 * m]  # target (and original) = the sampled size
    # A pipeline's VAE and U-Net are known once built: sampling.sizes is checked then.
    with pytest.raises(ConfigError, match=f"sampling.sizes: width {m + 1} is not a positive multiple of {m}"):
        TextToImageSystem(load_config(config, [f"sampling.sizes=[[{m + 1},{m}]]"]))
