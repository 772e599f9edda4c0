"""A pipeline imported with model.pretrained samples exactly what the diffusers pipeline samples.

Same DDIM scheduler config (SD's: leading spacing, steps_offset 1, set_alpha_to_one false), seed,
steps, guidance and initial latents (drawn as mmdiff draws x_T: ``torch.randn`` from a CPU
generator seeded with ``seed``); latents and decoded images agree within 1e-4.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import pytest

from mmdiff.config import load_config
from mmdiff.systems.text_to_image import TextToImageSystem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_pipelines import diffusers_ddim, mmdiff_ddim, pipeline_config  # noqa: E402


def _system(tmp_path: Path, folder: Path, *overrides: str) -> TextToImageSystem:
    return TextToImageSystem(load_config(pipeline_config(tmp_path, folder), list(overrides))).eval()


def _theirs(folder: Path, **kwargs) -> tuple:
    from diffusers import DiffusionPipeline

    return diffusers_ddim(DiffusionPipeline.from_pretrained(str(folder)), **kwargs)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_samples_equal_the_diffusers_pipeline(family: str, tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    latents, images = mmdiff_ddim(_system(tmp_path, pipeline_folders[family]))
    want_latents, want_images = _theirs(pipeline_folders[family])
    assert latents.shape == want_latents.shape and float(want_latents.std()) > 0.1
    assert (latents - want_latents).abs().max() < 1e-4
    assert (images - want_images).abs().max() < 1e-4


def test_sdxl_size_and_crop_conditioning_equals_the_pipeline(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    system = _system(tmp_path, pipeline_folders["sdxl"])
    sizes = dict(original_size=(64, 48), crop_top_left=(4, 2), target_size=(32, 32))
    latents, _ = mmdiff_ddim(system, **sizes)
    want, _ = _theirs(pipeline_folders["sdxl"], crops_coords_top_left=sizes["crop_top_left"],
                      **{k: v for k, v in sizes.items() if k != "crop_top_left"})
    assert (latents - want).abs().max() < 1e-4
    default, _ = mmdiff_ddim(system)
    assert (default - latents).abs().max() > 1e-3  # the ids reach the U-Net
    with pytest.raises(ValueError, match="SDXL micro-conditioning"):
        _system(tmp_path, pipeline_folders["sd1"]).sample(["x"], original_size=(8, 8))


def test_ddim_end_point_follows_set_alpha_to_one(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    """sampling.set_alpha_to_one=true (a user key over the pipeline's false) ends DDIM at ᾱ = 1,
    as diffusers' DDIMScheduler(set_alpha_to_one=True) does."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    folder = pipeline_folders["sd1"]
    latents, _ = mmdiff_ddim(_system(tmp_path, folder, "sampling.set_alpha_to_one=true"))
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    want, _ = diffusers_ddim(pipe)
    assert (latents - want).abs().max() < 1e-4
    other, _ = mmdiff_ddim(_system(tmp_path, folder))
    assert (other - latents).abs().max() > 1e-3
