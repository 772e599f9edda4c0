"""open_clip wrapper: tiny custom towers, text/image encoding, freezing, precision, loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from mmdiff.config import ClipConfig
from mmdiff.errors import CheckpointError, ConfigError
from mmdiff.models.clip import ClipEncoder


def clip_cfg(**overrides) -> DictConfig:
    cfg = OmegaConf.structured(ClipConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    torch.manual_seed(0)
    return ClipEncoder.from_config(clip_cfg())


def test_tokenizer_is_offline_and_sized_by_the_model(encoder: ClipEncoder) -> None:
    tokens = encoder.tokenize(["a handwritten digit seven", ""])
    assert tokens.dtype == torch.long and tokens.shape == (2, encoder.context_length) == (2, 32)
    assert tokens[:, 0].tolist() == [49406, 49406]  # <start_of_text>
    assert tokens[1, 1].item() == 49407 and tokens[1, 2:].eq(0).all()  # "" = SOT EOT pad…
    long_prompt = encoder.tokenize(["seven " * 100])
    assert long_prompt.shape == (1, 32) and long_prompt[0, -1].item() == 49407


def test_prompts_cut_off_are_exactly_those_past_the_context(encoder: ClipEncoder, caplog) -> None:
    from mmdiff.eval.generative import warn_cut_prompts

    fits = "x " * (encoder.context_length - 2)  # 30 words + start and end tokens = the whole context
    prompts = ["a digit", fits, fits + "x", "seven " * 100]
    assert encoder.prompts_cut_off(prompts) == [2, 3]

    class System:
        clip = encoder

    with caplog.at_level("WARNING", logger="mmdiff.inference.sample_files"):
        assert warn_cut_prompts(System(), prompts) == [2, 3]
    assert "2 of 4 prompt(s) are longer than the text encoder's 32-token context" in caplog.text
    assert "(prompt 3: 'x x x" in caplog.text


def test_text_states_and_pooled_shapes_last_vs_penultimate(encoder: ClipEncoder) -> None:
    tokens = encoder.tokenize(["a digit one", "a digit two"])
    states, pooled = encoder.encode_text(tokens)
    assert states.shape == (2, 32, encoder.text_width) == (2, 32, 64)
    assert pooled.shape == (2, encoder.embed_dim) == (2, 64)
    assert states.dtype == pooled.dtype == torch.float32
    penultimate = ClipEncoder.from_config(clip_cfg(text_layer="penultimate"))
    penultimate.load_state_dict(encoder.state_dict())
    p_states, p_pooled = penultimate.encode_text(tokens)
    assert not torch.allclose(p_states, states)
    assert torch.equal(p_pooled, pooled)  # pooled always from the last layer
    # both layers' states go through ln_final: zero mean per token (LayerNorm bias is 0 at init)
    assert p_states.mean(-1).abs().max() < 1e-4


def test_image_features_from_any_size(encoder: ClipEncoder) -> None:
    images = torch.rand(3, 3, 28, 40) * 2 - 1
    pooled, tokens = encoder.encode_image(images)
    assert pooled.shape == (3, encoder.embed_dim)
    assert tokens.shape == (3, (32 // 8) ** 2, encoder.image_token_width) == (3, 16, 64)
    same, _ = encoder.encode_image(torch.nn.functional.interpolate(images, size=32, mode="bicubic", antialias=True))
    assert torch.allclose(same, pooled, atol=1e-5)


def test_frozen_stays_eval_and_has_no_grads(encoder: ClipEncoder) -> None:
    parent = torch.nn.Sequential(encoder, torch.nn.Linear(2, 2))
    parent.train()
    assert parent[1].training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    states, pooled = encoder.encode_text(encoder.tokenize(["x"]))
    assert states.grad_fn is None and pooled.grad_fn is None


def test_unfrozen_trains_and_passes_gradients() -> None:
    enc = ClipEncoder.from_config(clip_cfg(freeze=False))
    enc.train()
    assert enc.model.training
    states, pooled = enc.encode_text(enc.tokenize(["x"]))
    (states.sum() + pooled.sum()).backward()
    assert enc.model.token_embedding.weight.grad is not None
    with torch.no_grad():  # a caller's no_grad wins over the unfrozen encoder
        states, _ = enc.encode_text(enc.tokenize(["x"]))
    assert not states.requires_grad


def test_two_different_tiny_configs_in_one_process(encoder: ClipEncoder) -> None:
    small = ClipEncoder.from_config(
        clip_cfg(**{"arch.embed_dim": 16, "arch.text.width": 32, "arch.text.context_length": 16})
    )
    assert (small.text_width, small.embed_dim, small.context_length) == (32, 16, 16)
    assert small.encode_text(small.tokenize(["x"]))[0].shape == (1, 16, 32)
    assert encoder.encode_text(encoder.tokenize(["x"]))[0].shape == (1, 32, 64)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_and_returns_float32(precision: str) -> None:
    enc = ClipEncoder.from_config(clip_cfg(precision=precision))
    states, pooled = enc.encode_text(enc.tokenize(["x"]))
    image_pooled, _ = enc.encode_image(torch.zeros(1, 3, 32, 32))
    for t in (states, pooled, image_pooled):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()


def test_custom_weights_file_round_trip(encoder: ClipEncoder, tmp_path: Path) -> None:
    save_file(encoder.model.state_dict(), tmp_path / "clip.safetensors")
    loaded = ClipEncoder.from_config(clip_cfg(pretrained=str(tmp_path / "clip.safetensors")))
    tokens = encoder.tokenize(["same weights"])
    assert torch.equal(loaded.encode_text(tokens)[1], encoder.encode_text(tokens)[1])


def test_missing_weights_and_unknown_names(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="do not exist") as err:
        ClipEncoder.from_config(clip_cfg(pretrained=str(missing)))
    assert str(missing) in str(err.value)
    with pytest.raises(CheckpointError, match="do not exist") as err:
        ClipEncoder.from_config(clip_cfg(name="ViT-B-32", pretrained=str(missing)))
    assert str(missing) in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'ViT-B-32'"):
        ClipEncoder.from_config(clip_cfg(name="ViT-B-322"))
