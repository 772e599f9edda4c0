"""A 10,000-character caption is cut to the text encoder's context (text_to_image) and to the
caption head's length (captioning targets) without error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mmdiff.config import load_config
from mmdiff.systems.registry import get_system

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
LONG_CAPTION = ("a very long caption about a handwritten digit " * 300)[:10_000]


def _system(tmp_path: Path, demo: str, model: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"base": [str(REPO / "configs/demo" / demo)], "model": model,
                                    "data": {"image_size": 16, "train_shards": [], "val_shards": []}}))
    cfg = load_config(path)
    torch.manual_seed(0)
    return get_system(cfg.system)(cfg)


def test_text_to_image_truncates_to_the_text_context(tmp_path: Path) -> None:
    system = _system(tmp_path, "text_to_image.yaml", {
        "vae": {"pretrained": None, "block_out_channels": [32, 32]}, "clip": {"pretrained": None},
        "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8}})
    length = system.clip.context_length
    tokens = system.clip.tokenize([LONG_CAPTION, "a digit"])
    assert tokens.shape == (2, length)
    eot = int(tokens[1].max())  # open_clip's end token has the largest id
    assert int(tokens[0, -1]) == eot  # cut to the context, still closed by the end token
    cond = system.encode_prompts([LONG_CAPTION, ""])
    assert cond["context"].shape[:2] == (2, length) and torch.isfinite(cond["context"]).all()
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": [LONG_CAPTION, ""]}
    assert torch.isfinite(system._loss(batch)["loss"])


@pytest.mark.parametrize("demo", ["caption_ar.yaml", "caption_diffusion.yaml"])
def test_captioning_targets_are_cut_to_the_head_length(tmp_path: Path, demo: str) -> None:
    system = _system(tmp_path, demo, {"clip": {"pretrained": None}, "caption": {
        "width": 32, "layers": 1, "heads": 2, "vocab_limit": 0}})
    vocab = system.vocab
    ids = vocab.encode([LONG_CAPTION, ""])
    assert ids.shape == (2, vocab.max_length)
    assert int(ids[0, -1]) == vocab.lookup[vocab.eot_token]  # full row, closed by the end token
    assert int(ids[1, 1]) == vocab.lookup[vocab.eot_token]  # empty caption: start, end, padding
    loss = system._loss(torch.rand(2, 3, 16, 16) * 2 - 1, [LONG_CAPTION, ""])["loss"]
    assert torch.isfinite(loss)
