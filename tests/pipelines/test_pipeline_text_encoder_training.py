"""model.clip.freeze: false with a pipeline's text encoder(s): the same trained-text-encoder promise
as tests/systems/test_text_encoder_training.py (every trained parameter gets a gradient, two groups)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

from mmdiff.config import load_config
from mmdiff.systems.text_to_image import TextToImageSystem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_pipelines import pipeline_config  # noqa: E402


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_pipeline_text_encoder_trains_only_what_gets_a_gradient(
        family: str, tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    config = pipeline_config(tmp_path, pipeline_folders[family], optim={"text_encoder_lr": 3e-4})
    model = TextToImageSystem(load_config(config, ["model.clip.freeze=false", "model.caption_dropout=0"]))
    assert not model.clip.frozen
    opt = model.configure_optimizers()["optimizer"]
    assert [g.get("name") for g in opt.param_groups] == ["denoiser", "text_encoder"]
    assert opt.param_groups[1]["lr"] == 3e-4 and opt.param_groups[1]["params"]
    size = int(model.cfg.data.image_size)
    batch = {"image": torch.rand(2, 3, size, size) * 2 - 1, "caption": ["a handwritten digit one", "seven"]}
    model.latent_scale.fill_(1.0)
    model._loss(batch)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.train()
    assert any(m.training for m in model.clip.modules() if any(p.requires_grad for p in m.parameters()))
