"""``model.lora`` config checks (one line each) and what a checkpoint keeps without a full base."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lorakit import base_system, tiny_config  # noqa: E402

from mmdiff.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.rank=4"], "model.lora needs base weights a checkpoint can find again"),
    (["model.lora.rank=-1"], "model.lora.rank must be >= 0"),
    (["model.lora.rank=4", "model.unet.pretrained=x", "model.lora.alpha=0"], "model.lora.alpha must be positive"),
    (["model.lora.rank=4", "model.unet.pretrained=x", "model.lora.unet_targets=[]"], "must name at least one"),
    (["model.lora.rank=4", "model.unet.pretrained=x", "model.lora.text_encoder=true",
      "model.lora.text_encoder_targets=[in_proj]"], "cannot hold in_proj"),
    (["model.lora.rank=4", "model.unet.pretrained=x", "model.lora.dropout=1.0"], "model.lora.dropout"),
    (["model.lora.rank=4", "model.unet.pretrained=x", "model.lora.init=pissa"], "unknown model.lora.init"),
])
def test_bad_lora_settings_are_one_line_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        tiny_config(overrides)
    assert "\n" not in str(err.value)


def test_a_target_that_matches_nothing_lists_the_modules(tmp_path: Path) -> None:
    from mmdiff.systems.text_to_image import TextToImageSystem

    folder = tmp_path / "unet"
    base_system().unet.save_pretrained(folder)
    cfg = tiny_config([f"model.unet.pretrained={folder}", "model.lora.rank=2", "model.lora.unet_targets=[to_qq]"])
    with pytest.raises(ConfigError, match=r"'to_qq' matches no linear layer; those that exist: .*to_q") as err:
        TextToImageSystem(cfg)
    assert "\n" not in str(err.value)
    cfg = tiny_config([f"model.unet.pretrained={folder}", "model.lora.rank=2", "model.lora.text_encoder=true",
                       "model.lora.text_encoder_targets=[c_fcc]"])
    with pytest.raises(ConfigError, match="c_fcc' matches no linear layer; those that exist: .*c_fc"):
        TextToImageSystem(cfg)


def test_unet_pretrained_base_keeps_the_weights_no_file_holds(tmp_path: Path) -> None:
    """With only model.unet.pretrained, the U-Net base is left out of checkpoints; the random VAE and
    CLIP (no file holds them) stay in, and the system loads its own checkpoint back."""
    from mmdiff.inference.api import load
    from mmdiff.models.lora import is_lora_key
    from mmdiff.systems.text_to_image import TextToImageSystem
    import torch

    folder = tmp_path / "unet"
    base_system().unet.save_pretrained(folder)
    system = TextToImageSystem(tiny_config([f"model.unet.pretrained={folder}", "model.lora.rank=2",
                                            "model.lora.text_encoder=true"]))
    optional = system.optional_checkpoint_keys()
    assert optional and all(k.startswith("unet.") and not is_lora_key(k) for k in optional)
    checkpoint = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}
    system.on_save_checkpoint(checkpoint)
    kept = checkpoint["state_dict"]
    assert not any(k in kept for k in optional)
    assert any(k.startswith("vae.") for k in kept) and any(k.startswith("clip.") for k in kept)
    assert any(k.startswith("clip.") and is_lora_key(k) for k in kept)  # text-encoder adapters
    torch.save(checkpoint, tmp_path / "lora.ckpt")
    loaded = load(tmp_path / "lora.ckpt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in system.state_dict().items())
