"""model.clip.freeze: false trains the text tower (only) in text_to_image and prior: its own AdamW
group and LR, EMA, checkpoints and mmdiff.load; and the combinations that cannot work are refused."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest
import torch
import yaml

import mmdiff
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.errors import ConfigError
from mmdiff.models.clip import ClipEncoder
from mmdiff.systems.registry import get_system

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
TINY_VAE = {"block_out_channels": [16, 32], "norm_num_groups": 16, "layers_per_block": 1,
            "latent_channels": 4, "scale_estimate_batches": 1, "scaling_factor": 1.0}
TINY_CLIP = {"name": "custom", "text_layer": "last",
             "arch": {"embed_dim": 32, "vision": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                                  "head_width": 16},
                      "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 2}}}
SYSTEMS = {
    "text_to_image": {"base": "text_to_image.yaml", "model": {
        "vae": TINY_VAE,
        # pooled text on: the text projection trains too (the case without it is tested below)
        "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8, "norm_num_groups": 8,
                 "use_pooled_text": True}}},
    "prior": {"base": "prior.yaml", "model": {"prior": {"width": 32, "layers": 1, "heads": 2}}},
}
LR, TEXT_LR = 1e-3, 3e-4


def _config(system: str, tmp: Path, shards: Path, clip: Dict[str, Any], steps: int = 3,
            **optim: Any) -> Path:
    """A toy config of ``system`` with ``model.clip`` = TINY_CLIP updated by ``clip``."""
    spec = SYSTEMS[system]
    model = {k: dict(v) for k, v in spec["model"].items()}
    model["clip"] = {**TINY_CLIP, "pretrained": None, **clip}
    model["vae"] = {**model.get("vae", {}), "pretrained": None}
    model["ema_decay"] = 0.5
    cfg = {
        "base": [str(REPO / "configs/demo" / spec["base"])],
        "run_dir": str(tmp / f"run-{system}"),
        "model": model,
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "image_size": 16, "batch_size": 4, "val_batch_size": 4, "num_workers": 0,
                 "steps_per_epoch": steps, "shuffle_buffer": 8},
        "sampling": {"prompts": ["a handwritten digit one"], "steps": 2, "every_n_steps": 0},
        "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant", **optim},
        "trainer": {"max_steps": steps, "val_every_n_steps": 100000, "limit_val_batches": 1,
                    "checkpoint_every_n_steps": steps, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "accelerator": "cpu", "devices": "1"},
        "logger": {"kind": "none"},
    }
    path = tmp / f"{system}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _build(system: str, tmp: Path, shards: Path, clip: Dict[str, Any], overrides: Sequence[str] = (),
           **optim: Any):
    cfg = load_config(_config(system, tmp, shards, clip, **optim), overrides)
    return get_system(system)(cfg)


def _names(encoder: ClipEncoder, pooled: bool = True) -> List[str]:
    return [f"clip.model.{n}" for n, _ in encoder.named_text_parameters(pooled)]


# ---------------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_only_the_text_tower_trains_in_two_groups(system: str, tmp_path: Path, demo_shards: Path) -> None:
    model = _build(system, tmp_path, demo_shards, {"freeze": False}, text_encoder_lr=TEXT_LR)
    clip = model.clip
    trainable = {n for n, p in clip.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in clip.named_text_parameters()}
    assert trainable and not any(n.startswith("visual.") or n == "logit_scale" for n in trainable)

    opt = model.configure_optimizers()["optimizer"]
    assert [g["name"] for g in opt.param_groups] == ["denoiser", "text_encoder"]
    assert [g["lr"] for g in opt.param_groups] == [LR, TEXT_LR]
    text_ids = {id(p) for p in opt.param_groups[1]["params"]}
    assert text_ids == {id(p) for p in clip.text_parameters()}
    assert not text_ids & {id(p) for p in opt.param_groups[0]["params"]}
    ema = [id(p) for p in model.ema_target.parameters() if p.requires_grad]
    assert set(ema) == {id(p) for g in opt.param_groups for p in g["params"]}

    model.train()
    assert clip.training and clip.model.transformer.training and not clip.model.visual.training
    model.eval()
    assert not clip.model.transformer.training


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_text_encoder_lr_null_is_optim_lr_and_the_schedule_scales_both(
        system: str, tmp_path: Path, demo_shards: Path) -> None:
    model = _build(system, tmp_path, demo_shards, {"freeze": False},
                   warmup_steps=4, schedule="cosine")
    out = model.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in opt.param_groups] == [LR / 4, LR / 4]  # warm-up step 0 of 4
    model.cfg.optim.text_encoder_lr = TEXT_LR
    out = model.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    for _ in range(2):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR * 3 / 4, TEXT_LR * 3 / 4])


def test_frozen_encoder_keeps_one_plain_group(tmp_path: Path, demo_shards: Path) -> None:
    model = _build("text_to_image", tmp_path, demo_shards, {})
    opt = model.configure_optimizers()["optimizer"]
    assert len(opt.param_groups) == 1 and "name" not in opt.param_groups[0]
    assert model.ema_target is model.unet
    assert not any(p.requires_grad for p in model.clip.parameters())


@pytest.mark.parametrize("text_layer", ["last", "penultimate"])
def test_every_trained_text_parameter_gets_a_gradient_without_pooled_text(
        text_layer: str, tmp_path: Path, demo_shards: Path) -> None:
    """DDP stops on a trainable parameter without a gradient: with no pooled text the projection
    (and, penultimate, the last block) must not train."""
    model = _build("text_to_image", tmp_path, demo_shards, {"freeze": False, "text_layer": text_layer},
                   overrides=["model.unet.use_pooled_text=false"])
    assert "clip.model.text_projection" not in _names(model.clip, pooled=False)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a handwritten digit one", "seven"]}
    model._loss(batch)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.clip.text_parameters(pooled=False))


def test_prior_text_encoder_gets_gradients(tmp_path: Path, demo_shards: Path) -> None:
    model = _build("prior", tmp_path, demo_shards, {"freeze": False})
    model._loss(torch.rand(2, 3, 16, 16) * 2 - 1, ["a handwritten digit one", "seven"])["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


# ---------------------------------------------------------------------------------- round trip
def _clip_file(system: str, tmp: Path, shards: Path) -> Path:
    cfg = load_config(_config(system, tmp, shards, {}))
    torch.manual_seed(0)
    path = tmp / "clip.pt"
    torch.save(ClipEncoder.from_config(cfg.model.clip).model.state_dict(), path)
    return path


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_trained_text_encoder_round_trips_through_checkpoint_and_ema(
        system: str, tmp_path: Path, demo_shards: Path) -> None:
    initial_path = _clip_file(system, tmp_path, demo_shards)
    initial = torch.load(initial_path, weights_only=True)
    config = _config(system, tmp_path, demo_shards, {"freeze": False, "pretrained": str(initial_path)},
                     text_encoder_lr=TEXT_LR)
    assert main(["fit", str(config)]) == 0
    ckpt_path = tmp_path / f"run-{system}" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, weights_only=True)
    trained = checkpoint["state_dict"]

    raw = mmdiff.load(ckpt_path, use_ema=False, device="cpu")
    assert not raw.training and not raw.clip.training
    text_names = _names(raw.clip)
    prefix = len("clip.model.")
    for name, value in raw.state_dict().items():
        if name.startswith("clip.model."):
            assert torch.equal(value, trained[name]), name  # the checkpoint holds the trained encoder
            changed = not torch.equal(value, initial[name[prefix:]])
            assert changed == (name in text_names), name  # text tower trained, vision tower untouched

    ema = checkpoint["callbacks"]["EMA"]["shadow"]
    averaged = mmdiff.load(ckpt_path, device="cpu")
    assert averaged.ema_loaded
    text = averaged.clip.text_parameters()
    for p, s, name in zip(text, ema[-len(text):], text_names):
        assert torch.equal(p, s.to(p.dtype)), name
    assert any(not torch.equal(p, trained[n]) for p, n in zip(text, text_names))  # EMA ≠ last weights

    if system == "text_to_image":  # an unCLIP decoder initialised from it takes its EMA text encoder
        cfg = load_config(config, [f"model.init_from={ckpt_path}", "model.image_embed_conditioning=time"])
        decoder = get_system(system)(cfg)
        for p, s, name in zip(decoder.clip.text_parameters(), ema[-len(text):], text_names):
            assert torch.equal(p, s.to(p.dtype)), name


def test_unclip_pair_needs_one_image_tower_not_one_text_tower(tmp_path: Path, demo_shards: Path) -> None:
    from types import SimpleNamespace

    from mmdiff.errors import CheckpointError
    from mmdiff.inference.unclip import check_pair

    cfg = load_config(_config("prior", tmp_path, demo_shards, {"freeze": False}))
    encoders = []
    for _ in range(2):
        torch.manual_seed(0)
        encoders.append(ClipEncoder.from_config(cfg.model.clip))
    prior, decoder = SimpleNamespace(embed_dim=32, clip=encoders[0]), SimpleNamespace(clip=encoders[1])
    with torch.no_grad():
        encoders[1].model.token_embedding.weight.add_(1.0)  # the decoder trained its text tower
    check_pair(prior, decoder)
    with torch.no_grad():
        encoders[1].model.visual.conv1.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="different CLIP"):
        check_pair(prior, decoder)


# ---------------------------------------------------------------------------------- refused
REFUSED = [
    (["optim.text_encoder_lr=1e-5"], "optim.text_encoder_lr is set but no text encoder is trained"),
    (["model.clip.freeze=false", "model.precomputed=true", "data.load_images=false",
      "data.array_keys=[latent,context,pooled]"], "model.precomputed reads fixed text states"),
    (["model.clip.freeze=false", "model.clip.precision=bf16"], "model.clip.precision=bf16 would store"),
    (["model.clip.freeze=false", "trainer.strategy=fsdp"], "trainer.strategy=fsdp shards the denoiser only"),
]


@pytest.mark.parametrize("overrides,message", REFUSED)
def test_refused_in_one_line(overrides: List[str], message: str, tmp_path: Path, demo_shards: Path) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(_config("text_to_image", tmp_path, demo_shards, {}), overrides)
    assert "\n" not in str(err.value)


def test_prior_refuses_text_encoder_lr_with_frozen_encoder(tmp_path: Path, demo_shards: Path) -> None:
    with pytest.raises(ConfigError, match="optim.text_encoder_lr is set"):
        load_config(_config("prior", tmp_path, demo_shards, {}), ["optim.text_encoder_lr=1e-5"])


@pytest.mark.parametrize("system,overrides,message", [
    ("captioning", ["model.clip.freeze=false", "optim.text_encoder_lr=1e-5"], "no text encoder is trained"),
    ("contrastive", ["model.clip.precision=fp16"], "model.clip.precision=fp16 would store"),
    ("autoencoder", ["model.clip.freeze=false"], "has no CLIP"),
    ("autoencoder", ["model.vae.precision=bf16"], "trains the VAE in float32"),
])
def test_other_systems_refuse_clip_keys_without_effect(system: str, overrides: List[str], message: str,
                                                      tmp_path: Path, demo_shards: Path) -> None:
    config = _config("text_to_image", tmp_path, demo_shards, {})
    with pytest.raises(ConfigError, match=message):
        load_config(config, [f"system={system}", *overrides])


@pytest.mark.parametrize("freeze,dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_a_trained_text_encoder_runs_under_the_trainers_autocast(
        freeze: bool, dtype: torch.dtype, tmp_path: Path, demo_shards: Path) -> None:
    """A frozen encoder runs in its own precision outside autocast; a trained one is mixed precision."""
    model = _build("text_to_image", tmp_path, demo_shards, {"freeze": freeze})
    seen: List[torch.dtype] = []
    model.clip.model.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context = model.encode_prompts(["a handwritten digit one"])["context"]
    assert seen == [dtype] and context.dtype == torch.float32


def test_captioning_fine_tunes_the_image_tower_only(tmp_path: Path, demo_shards: Path) -> None:
    """Its caption loss gives the text tower no gradient: training it would stop DDP."""
    config = _config("text_to_image", tmp_path, demo_shards, {"freeze": False})
    cfg = load_config(config, ["system=captioning",
                               "model.caption.width=32", "model.caption.layers=1", "model.caption.heads=2",
                               "model.caption.vocab_limit=0"])
    model = get_system("captioning")(cfg)
    trainable = {n for n, p in model.clip.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.clip.model.named_parameters() if n.startswith("visual.")}
    model._loss(torch.rand(2, 3, 16, 16) * 2 - 1, ["a handwritten digit one", "seven"])["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.train()
    assert model.clip.model.visual.training and not model.clip.model.transformer.training
