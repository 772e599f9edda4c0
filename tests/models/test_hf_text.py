"""transformers CLIP text encoders <-> open_clip towers: outputs equal the diffusers recipes exactly."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mmdiff.config import ClipConfig
from mmdiff.errors import CheckpointError
from mmdiff.models.clip import ClipEncoder
from mmdiff.models.clip_tokenizer import EOS_TOKEN, clip_tokenizer
from mmdiff.models.hf_text import (
    TextEncoderSpec,
    hf_from_open_clip_text,
    hf_from_text_transformer,
    text_transformer_from_hf,
)
from mmdiff.models.pipeline_text import PipelineTextEncoder

PROMPTS = [
    "a photo of a cat",
    "",
    "wow!! a dog, (sitting) on: a mat; 100% real?!",
    "a very long prompt " * 30,  # truncated
]
ATOL = 1e-5


def tiny_hf(*, act: str, width: int = 32, layers: int = 3, eos: int = 2, positions: int = 77,
            projection: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=positions, hidden_act=act, projection_dim=16,
        eos_token_id=eos, bos_token_id=49406,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0), so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# family: (models, specs, reference(models, ids per tower) -> (states, pooled))
def _sd1():
    model = tiny_hf(act="quick_gelu")
    return [model], [TextEncoderSpec.from_hf(model, pad_token=EOS_TOKEN)]


def _sd2():
    model = tiny_hf(act="gelu", layers=2)
    return [model], [TextEncoderSpec.from_hf(model, pad_token="!")]


def _sdxl():
    one = tiny_hf(act="quick_gelu", seed=1)
    two = tiny_hf(act="gelu", width=48, eos=49407, projection=True, seed=2)
    return [one, two], [
        TextEncoderSpec.from_hf(one, hidden_layer=-2, final_layer_norm=False, pad_token=EOS_TOKEN),
        TextEncoderSpec.from_hf(two, hidden_layer=-2, final_layer_norm=False, pad_token="!"),
    ]


def _short():
    model = tiny_hf(act="quick_gelu", layers=2, positions=16, eos=49407)
    return [model], [TextEncoderSpec.from_hf(model, pad_token=EOS_TOKEN)]


FAMILIES = {"sd1": _sd1, "sd2": _sd2, "sdxl": _sdxl, "short": _short}


def pipeline_ids(spec: TextEncoderSpec, prompts: list[str]) -> torch.Tensor:
    """What a diffusers pipeline's tokenizer gives (padding to max length, truncation)."""
    tok = clip_tokenizer(spec.pad_token, spec.context_length)
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


@torch.no_grad()
def diffusers_recipe(family: str, models, specs, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """The states and pooled embedding the diffusers pipelines feed their U-Nets."""
    ids = [pipeline_ids(s, prompts) for s in specs]
    if family == "sdxl":  # StableDiffusionXLPipeline.encode_prompt
        states, pooled = [], None
        for model, tokens in zip(models, ids):
            out = model(tokens, output_hidden_states=True)
            pooled = out[0]  # the last encoder's text_embeds
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled
    out = models[0](ids[0])  # StableDiffusionPipeline.encode_prompt: [0] = last_hidden_state
    return out[0], out.pooler_output


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    models, specs = FAMILIES[request.param]()
    return request.param, models, specs, PipelineTextEncoder.from_hf(models, specs)


def test_states_and_pooled_equal_the_diffusers_recipe(family) -> None:
    name, models, specs, encoder = family
    want_states, want_pooled = diffusers_recipe(name, models, specs, PROMPTS)
    states, pooled = encoder.encode_text(encoder.tokenize(PROMPTS))
    assert states.dtype == pooled.dtype == torch.float32
    assert states.shape == (len(PROMPTS), encoder.context_length, encoder.text_width)
    assert pooled.shape == (len(PROMPTS), encoder.embed_dim)
    torch.testing.assert_close(states, want_states, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, want_pooled, atol=ATOL, rtol=0)


def test_token_ids_are_the_pipeline_tokenizers(family) -> None:
    _, _, specs, encoder = family
    ids = encoder.tokenize(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), len(specs), encoder.context_length)
    for index, spec in enumerate(specs):
        tower_ids = ids[:, index]
        assert torch.equal(tower_ids, pipeline_ids(spec, PROMPTS))
        pad = 49407 if spec.pad_token == EOS_TOKEN else 0
        assert tower_ids[:, 0].eq(49406).all()
        assert tower_ids[1, 1] == 49407 and tower_ids[1, 2:].eq(pad).all()  # "" = SOT EOT pad…
        assert tower_ids[3, -1] == 49407 and (tower_ids[3] == 49407).sum() == 1  # truncated: EOT last
    # the punctuation prompt (18 tokens) fits 77 positions, not 16
    assert encoder.prompts_cut_off(PROMPTS) == ([3] if encoder.context_length == 77 else [2, 3])


def test_round_trip_gives_identical_state_dicts_and_configs(family) -> None:
    _, models, specs, _ = family
    for model, spec in zip(models, specs):
        back = hf_from_text_transformer(text_transformer_from_hf(model), with_projection=spec.with_projection,
                                        hf_config=spec.hf_config)
        assert type(back) is type(model)
        want, got = model.state_dict(), back.state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
        assert back.config.to_diff_dict() == model.config.to_diff_dict()


def test_rebuilt_from_specs_and_state_dict_gives_the_same_outputs(family) -> None:
    _, _, _, encoder = family
    specs = json.loads(json.dumps(encoder.specs))  # hyper-parameters are plain JSON
    rebuilt = PipelineTextEncoder.from_specs(specs)
    rebuilt.load_state_dict(encoder.state_dict())
    tokens = encoder.tokenize(PROMPTS[:2])
    for a, b in zip(rebuilt.encode_text(tokens), encoder.encode_text(tokens)):
        assert torch.equal(a, b)


def test_custom_open_clip_tower_exports_to_transformers() -> None:
    torch.manual_seed(0)
    cfg = OmegaConf.structured(ClipConfig)
    clip = ClipEncoder.from_config(cfg)
    assert clip.text_layer == "last"
    with torch.no_grad():  # LayerNorms away from their (1, 0) init, so a dropped one shows
        for name, p in clip.model.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    tokens = clip.tokenize(PROMPTS)  # open_clip's tokenizer: zero padding
    states, pooled = clip.encode_text(tokens)
    hf = hf_from_open_clip_text(clip.model, with_projection=True)
    assert isinstance(hf, CLIPTextModelWithProjection)
    with torch.no_grad():
        out = hf(tokens)
    torch.testing.assert_close(out.last_hidden_state, states, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.text_embeds, pooled, atol=ATOL, rtol=0)
    plain = hf_from_open_clip_text(clip.model, with_projection=False)
    assert isinstance(plain, CLIPTextModel)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).last_hidden_state, states, atol=ATOL, rtol=0)


def test_frozen_by_default_and_trainable_when_asked() -> None:
    models, specs = _sd1()
    frozen = PipelineTextEncoder.from_hf(models, specs)
    frozen.train()
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = PipelineTextEncoder.from_hf(models, specs, freeze=False)
    trainable.train()
    assert trainable.training
    states, pooled = trainable.encode_text(trainable.tokenize(["a cat"]))
    (states.sum() + pooled.sum()).backward()
    assert trainable.towers[0].transformer.resblocks[0].attn.in_proj_weight.grad is not None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_computes_low_and_returns_float32(precision: str) -> None:
    models, specs = _sdxl()
    encoder = PipelineTextEncoder.from_hf(models, specs, precision=precision)
    assert encoder.towers[0].transformer.get_cast_dtype() != torch.float32
    states, pooled = encoder.encode_text(encoder.tokenize(PROMPTS[:2]))
    want_states, want_pooled = diffusers_recipe("sdxl", models, specs, PROMPTS[:2])
    assert states.dtype == pooled.dtype == torch.float32
    torch.testing.assert_close(states, want_states, atol=0.1, rtol=0.05)
    torch.testing.assert_close(pooled, want_pooled, atol=0.1, rtol=0.05)


def test_bad_specs_are_one_sentence_errors() -> None:
    models, specs = _sd2()
    with pytest.raises(CheckpointError, match="hidden_layer -3"):
        TextEncoderSpec.from_hf(models[0], hidden_layer=-3)
    with pytest.raises(CheckpointError, match="context_length 78"):
        TextEncoderSpec.from_hf(models[0], context_length=78)
    with pytest.raises(CheckpointError, match="unknown keys"):
        TextEncoderSpec.from_dict({**specs[0].to_dict(), "layer": 1})
    with pytest.raises(CheckpointError, match="hidden_act 'relu'"):
        PipelineTextEncoder.from_specs([{**specs[0].to_dict(), "hf_config": {"hidden_act": "relu"}}])
    encoder = PipelineTextEncoder.from_hf(models, specs)
    with pytest.raises(CheckpointError, match="tokenize"):
        encoder.encode_text(torch.zeros(2, 2, 77, dtype=torch.long))
