"""The contract every registered system meets (mmdiff.systems.base.System), checked the same way for
each: build from a config → one training step with `mmdiff fit` → checkpoint → `mmdiff.load` with
the pretrained files gone → the same weights (and EMA weights) → finite inference and previews.

A new built-in system is picked up from the registry; it needs its tiny config in TINY and its
inference call in INFER.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
import yaml

import mmdiff
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.systems.base import System
from mmdiff.systems.registry import builtin_system_names, get_system

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a handwritten digit one"
TINY_VAE = {"block_out_channels": [16, 32], "norm_num_groups": 16, "layers_per_block": 1,
            "latent_channels": 4, "scale_estimate_batches": 1}
TINY_HEAD = {"width": 32, "layers": 1, "heads": 2}

# Per system: its demo config and the sections that make it tiny.
TINY: Dict[str, Dict[str, Any]] = {
    "autoencoder": {"base": "vae.yaml", "model": {"vae": TINY_VAE}},
    "text_to_image": {"base": "text_to_image.yaml", "model": {
        "vae": TINY_VAE,
        "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8, "norm_num_groups": 8}}},
    "contrastive": {"base": "clip.yaml", "model": {}},
    "captioning": {"base": "caption_ar.yaml", "model": {"caption": TINY_HEAD}},
    "prior": {"base": "prior.yaml", "model": {"prior": TINY_HEAD}},
}

# Per system: its inference call on the loaded model (images B×3×16×16 in [-1, 1]).
INFER: Dict[str, Callable[[Any, torch.Tensor], Any]] = {
    "autoencoder": lambda s, images: s.reconstruct(images),
    "text_to_image": lambda s, images: s.sample([PROMPT], seed=0, steps=2),
    "contrastive": lambda s, images: torch.cat([s.embed_images(images), s.embed_texts([PROMPT])]),
    "captioning": lambda s, images: s.caption(images, seed=0),
    "prior": lambda s, images: s.sample([PROMPT], seed=0, steps=2),
}


def _write(path: Path, cfg: Dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tiny_config(name: str, tmp: Path, shards: Path, pretrained: Dict[str, str]) -> Path:
    spec = TINY[name]
    model = {section: dict(values) for section, values in spec["model"].items()}
    model.setdefault("clip", {})
    model.setdefault("vae", {})
    model["clip"]["pretrained"] = pretrained.get("clip")
    model["vae"]["pretrained"] = pretrained.get("vae")
    model["ema_decay"] = 0.5
    cfg = {
        "base": [str(REPO / "configs/demo" / spec["base"])],
        "run_dir": str(tmp / "run"),
        "model": model,
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "image_size": 16, "batch_size": 4, "val_batch_size": 4, "num_workers": 0,
                 "steps_per_epoch": 2, "shuffle_buffer": 8},
        "sampling": {"prompts": [PROMPT], "steps": 2, "every_n_steps": 0},
        "optim": {"warmup_steps": 0},
        "trainer": {"max_steps": 1, "val_every_n_steps": 100000, "limit_val_batches": 1,
                    "checkpoint_every_n_steps": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "accelerator": "cpu", "devices": "1"},
        "logger": {"kind": "none"},
    }
    return _write(tmp / f"{name}.yaml", cfg)


def _pretrained_files(name: str, tmp: Path, shards: Path) -> Dict[str, str]:
    """Random-init weight files for the frozen parts the system reads at build time, so that the
    test can check the checkpoint alone rebuilds it (from_checkpoint_config)."""
    from mmdiff.models.clip import ClipEncoder
    from mmdiff.models.vae import build_vae

    cfg = load_config(_tiny_config(name, tmp, shards, {}))
    files = {"clip": tmp / "clip.pt", "vae": tmp / "vae.pt"}
    torch.manual_seed(0)
    torch.save(ClipEncoder.from_config(cfg.model.clip).model.state_dict(), files["clip"])
    torch.save(build_vae(cfg.model.vae).state_dict(), files["vae"])
    return {k: str(v) for k, v in files.items()}


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return all(_finite(v) for v in value)


def test_every_builtin_system_has_a_contract_case() -> None:
    assert set(builtin_system_names()) == set(TINY) == set(INFER), "add the new system to TINY and INFER"


@pytest.mark.parametrize("name", builtin_system_names())
def test_system_contract(name: str, tmp_path: Path, demo_shards: Path) -> None:
    cls = get_system(name)
    assert issubclass(cls, System) and cls.system_name == name

    pretrained = _pretrained_files(name, tmp_path, demo_shards)
    assert main(["fit", str(_tiny_config(name, tmp_path, demo_shards, pretrained))]) == 0
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for path in pretrained.values():  # the checkpoint alone must rebuild the system
        Path(path).unlink()

    checkpoint = torch.load(ckpt_path, weights_only=True)
    assert checkpoint["hyper_parameters"]["config"]["system"] == name
    system = mmdiff.load(ckpt_path, use_ema=False, device="cpu")
    assert type(system) is cls and not system.training
    state = system.state_dict()
    assert set(state) == set(checkpoint["state_dict"])
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())

    ema = checkpoint.get("callbacks", {}).get("EMA")
    assert (ema is not None) == (system.ema_target is not None)
    averaged = mmdiff.load(ckpt_path, device="cpu")
    assert averaged.ema_loaded == (ema is not None)
    if ema is not None:
        params = [p for p in averaged.ema_target.parameters() if p.requires_grad]
        assert len(params) == len(ema["shadow"])
        assert all(torch.equal(p, s.to(p.dtype)) for p, s in zip(params, ema["shadow"]))

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = INFER[name](system, images)
    if name == "captioning":
        assert len(out) == 2 and all(isinstance(c, str) for c in out)
    else:
        assert _finite(out)
    previews = system.preview_images()
    assert isinstance(previews, dict)
    for value in previews.values():
        pictures = value[0] if isinstance(value, tuple) else value
        assert pictures.ndim == 4 and pictures.shape[1] == 3 and _finite(pictures)
        assert float(pictures.min()) >= -1 and float(pictures.max()) <= 1
