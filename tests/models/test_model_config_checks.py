"""Architecture mistakes in model.vae / model.clip / model.unet fail at config load, in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmdiff.config import load_config
from mmdiff.errors import ConfigError


@pytest.mark.parametrize(
    ("system", "model", "message"),
    [
        ("autoencoder", {"vae": {"block_out_channels": [24, 48]}}, "divisible by model.vae.norm_num_groups"),
        ("autoencoder", {"vae": {"kl_weight": -1.0}}, "model.vae.kl_weight must be >= 0"),
        ("text_to_image", {"unet": {"attention_head_dim": 48}}, "divisible by model.unet.attention_head_dim"),
        ("text_to_image", {"unet": {"up_block_types": ["UpBlock2D"]}}, "must have the same length"),
        ("text_to_image", {"clip": {"arch": {"text": {"heads": 3}}}}, "divisible by text.heads"),
        ("text_to_image", {"clip": {"text_layer": "penultimate", "arch": {"text": {"layers": 1}}}},
         "needs model.clip.arch.text.layers >= 2"),
    ],
)
def test_bad_architectures_are_config_errors(tmp_path: Path, system: str, model: dict, message: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"system": system, "model": model}))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_default_model_sections_pass(tmp_path: Path) -> None:
    for system in ("autoencoder", "text_to_image"):
        path = tmp_path / f"{system}.yaml"
        path.write_text(yaml.safe_dump({"system": system}))
        load_config(path)
