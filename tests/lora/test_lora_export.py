"""``mmdiff export --lora``: diffusers' own loader reproduces mmdiff's adapted U-Net and text
encoder, and the normal export of a LoRA model holds the merged weights."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lorakit import base_system, lora_system, write_base_checkpoint  # noqa: E402

from mmdiff.errors import UsageError  # noqa: E402
from mmdiff.inference.export import export_folder, export_single_file  # noqa: E402
from mmdiff.inference.lora_export import WEIGHT_NAME, export_lora  # noqa: E402

TOL = 1e-5


class Loader(StableDiffusionLoraLoaderMixin):
    """The part of a StableDiffusionPipeline that ``load_lora_weights`` uses."""

    def __init__(self, unet, text_encoder=None) -> None:
        self.unet, self.text_encoder = unet, text_encoder
        self.components = {"unet": unet, "text_encoder": text_encoder}
        self.hf_device_map = None


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    system = base_system()
    return system, write_base_checkpoint(system, tmp_path_factory.mktemp("base") / "base.ckpt")


def _unet_inputs(system, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, system.latent_channels, system.latent_size, system.latent_size, generator=g)
    context = torch.randn(2, system.clip.context_length, system.clip.text_width, generator=g)
    pooled = torch.randn(2, system.clip.embed_dim, generator=g)
    return (x, torch.tensor([20, 700])), {"encoder_hidden_states": context, "class_labels": pooled}


@torch.no_grad()
def _out(unet, inputs) -> torch.Tensor:
    args, kwargs = inputs
    return unet(*args, **kwargs).sample


def test_load_lora_weights_reproduces_the_adapted_unet(base, tmp_path: Path) -> None:
    system, ckpt = base
    adapted = lora_system(ckpt, overrides=["model.lora.alpha=6"])  # alpha != rank: the metadata carries it
    path = export_lora(adapted, tmp_path / "lora")
    assert path == tmp_path / "lora" / WEIGHT_NAME
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") for k in keys)
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 6.0
    inputs = _unet_inputs(system)
    fresh = UNet2DConditionModel.from_config(system.unet.config)
    fresh.load_state_dict(system.unet.state_dict())  # the base weights
    base_out = _out(fresh, inputs)
    Loader(fresh).load_lora_weights(str(tmp_path / "lora"))
    want = _out(adapted.unet, inputs)
    got = _out(fresh, inputs)
    assert float((want - base_out).abs().max()) > 1e-3  # the adapters change the output
    assert float((got - want).abs().max()) <= TOL


def test_text_encoder_adapters_land_on_the_transformers_layers(base, tmp_path: Path) -> None:
    """open_clip resblocks.N.attn.out_proj / mlp.c_fc / mlp.c_proj adapters become the same low-rank
    updates of a CLIPTextModel's layers.N.self_attn.out_proj / mlp.fc1 / mlp.fc2."""
    from transformers import CLIPTextConfig, CLIPTextModel

    system, ckpt = base
    adapted = lora_system(ckpt, text_encoder=True)
    export_lora(adapted, tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / WEIGHT_NAME), "pt") as f:
        text_keys = [k for k in f.keys() if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    tower = adapted.clip._text
    width, layers = tower.transformer.width, len(tower.transformer.resblocks)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                           num_attention_heads=tower.transformer.resblocks[0].attn.num_heads,
                                           max_position_embeddings=tower.context_length, vocab_size=49408))
    fresh = UNet2DConditionModel.from_config(system.unet.config)
    Loader(fresh, encoder).load_lora_weights(str(tmp_path / "lora"))
    pairs = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for n in range(layers):
        for ours, theirs in pairs.items():
            mine = tower.transformer.resblocks[n].get_submodule(ours)
            loaded = layers_of(encoder)[n].get_submodule(theirs)
            want = mine.get_delta_weight("default").detach()
            got = loaded.get_delta_weight(loaded.active_adapters[0]).detach()
            assert float(want.abs().max()) > 0 and float((got - want).abs().max()) <= TOL, (n, ours)


def test_merged_export_equals_the_adapted_model(base, tmp_path: Path) -> None:
    """The diffusers folder and the single file of a LoRA model hold the adapters merged (scale 1)."""
    system, ckpt = base
    adapted = lora_system(ckpt, text_encoder=True)
    inputs = _unet_inputs(system, seed=1)
    want = _out(adapted.unet, inputs)
    tokens = adapted.clip.tokenize(["a handwritten digit one"])
    with torch.no_grad():
        want_text = adapted.clip.encode_text(tokens)[0]
    export_folder(adapted, tmp_path / "folder")
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "folder" / "unet")
    assert not any("lora" in k or "base_layer" in k for k in exported.state_dict())
    assert float((_out(exported, inputs) - want).abs().max()) <= TOL
    assert json.loads((tmp_path / "folder" / "mmdiff.json").read_text())["lora_merged"] is True
    import open_clip

    text = open_clip.create_model("local-dir:" + str(tmp_path / "folder" / "text_encoder"))
    assert not any("lora" in k for k in text.state_dict())
    from safetensors.torch import load_file

    single = load_file(str(export_single_file(adapted, tmp_path / "one.safetensors")))
    assert not any("lora" in k or "base_layer" in k for k in single)
    assert torch.equal(single["unet.conv_in.weight"], exported.state_dict()["conv_in.weight"])
    # the exported text tower's weights give the adapted text states
    merged_states = _merged_text_states(adapted, text, tokens)
    assert float((merged_states - want_text).abs().max()) <= TOL
    assert adapted.lora is not None and adapted.unet.peft_config  # the system itself is unchanged


def _merged_text_states(adapted, text_model, tokens) -> torch.Tensor:
    """The text states of ``adapted``'s encoder with ``text_model``'s (merged) weights."""
    from mmdiff.models.clip import ClipEncoder

    encoder = ClipEncoder(text_model, adapted.clip.tokenizer, adapted.clip.text_layer)
    with torch.no_grad():
        return encoder.encode_text(tokens)[0]


def test_lora_export_refuses_a_model_without_adapters(base, tmp_path: Path) -> None:
    system, _ = base
    with pytest.raises(UsageError, match="trained without them"):
        export_lora(system, tmp_path / "lora")


def layers_of(encoder):
    """A CLIPTextModel's encoder layers (transformers 5 dropped the ``text_model`` level; its
    checkpoints and LoRA files keep the ``text_model.`` names)."""
    inner = getattr(encoder, "text_model", encoder)
    return inner.encoder.layers
