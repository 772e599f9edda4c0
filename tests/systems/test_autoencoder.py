"""Autoencoder system: a few Lightning steps on in-memory dict batches, checkpoint → build_vae."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from mmdiff.config import schema
from mmdiff.models.vae import build_vae, vae_downsample_factor
from mmdiff.systems.autoencoder import AutoencoderSystem
from mmdiff.systems.registry import get_system


class _Images(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        low = torch.rand(3, 4, 4, generator=g)
        image = torch.nn.functional.interpolate(low[None], size=16, mode="bilinear")[0] * 2 - 1
        return {"image": image, "caption": f"image {i}"}


def ae_cfg(**overrides) -> DictConfig:
    cfg = schema()
    cfg.system = "autoencoder"
    cfg.trainer.max_steps = 3
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _fit(cfg: DictConfig, max_steps: int = 3) -> tuple[AutoencoderSystem, L.Trainer]:
    L.seed_everything(0, verbose=False)
    system = AutoencoderSystem(cfg)
    loader = DataLoader(_Images(), batch_size=4)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=2,
        gradient_clip_val=1.0,
    )
    trainer.fit(system, loader, loader)
    return system, trainer


@pytest.fixture(scope="module")
def fitted() -> tuple[AutoencoderSystem, L.Trainer]:
    return _fit(ae_cfg())


def test_registered_and_trains_with_finite_losses(fitted) -> None:
    system, trainer = fitted
    assert get_system("autoencoder") is AutoencoderSystem
    assert trainer.global_step == 3
    m = trainer.callback_metrics
    for key in ("train/loss", "train/rec", "train/kl", "val/loss", "val/psnr", "val/ssim"):
        assert key in m and math.isfinite(float(m[key])), key
    assert system.hparams["config"]["system"] == "autoencoder"


def test_val_images_and_previews(fitted) -> None:
    system, _ = fitted
    originals, recon = system.val_images
    assert originals.shape == recon.shape == (4, 3, 16, 16)
    assert recon.min() >= -1 and recon.max() <= 1
    grid, nrow = system.preview_images()["reconstructions"]
    assert grid.shape == (8, 3, 16, 16) and nrow == 4
    assert torch.isfinite(grid).all() and float(grid.std()) > 0.01


class _Padded(Dataset):
    """``_Images`` 0-3 as real rows, then 4 placeholders (``valid=False``, zero images) as the
    loader makes for rank padding and corrupt samples."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        if i < 4:
            return {**_Images()[i], "valid": True}
        return {"image": torch.zeros(3, 16, 16), "caption": "", "valid": False}


def test_validation_scores_only_valid_rows(fitted) -> None:
    system, _ = fitted
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (real,) = trainer.validate(system, DataLoader([_Images()[i] for i in range(4)], batch_size=4),
                              verbose=False)
    first_real = system.val_images
    (padded,) = trainer.validate(system, DataLoader(_Padded(), batch_size=8), verbose=False)
    for key in ("val/loss", "val/psnr", "val/ssim"):
        assert padded[key] == pytest.approx(real[key], rel=1e-4), key
    assert torch.equal(system.val_images[0], first_real[0])  # previews show real images only


def test_checkpoint_loads_into_build_vae_without_repeating_the_architecture(fitted, tmp_path: Path) -> None:
    system, trainer = fitted
    ckpt = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(ckpt)
    # the architecture comes from the checkpoint, not these (different) fields
    cfg = schema().model.vae
    cfg.block_out_channels = [32, 64, 64]
    cfg.pretrained = str(ckpt)
    vae = build_vae(cfg)
    assert vae_downsample_factor(cfg) == 2
    expected = system.vae.state_dict()
    assert set(vae.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in vae.state_dict().items())
    again = AutoencoderSystem.load_from_checkpoint(ckpt)
    assert torch.equal(again.vae.decoder.conv_out.weight, system.vae.decoder.conv_out.weight)


def test_discriminator_path_trains_and_counts_batches_as_steps() -> None:
    cfg = ae_cfg(**{"model.vae.use_discriminator": True, "model.vae.disc_start_step": 1,
                    "model.vae.disc_channels": 16, "model.vae.disc_layers": 2,
                    "model.vae.recon_loss": "l2"})
    system, trainer = _fit(cfg)
    assert trainer.global_step == 3
    m = trainer.callback_metrics
    for key in ("train/loss", "train/g_loss", "train/d_loss", "train/d_weight"):
        assert math.isfinite(float(m[key])), key
    assert float(m["train/d_weight"]) > 0  # past disc_start_step the generator term is on
    assert system.discriminator is not None
    assert all(p.requires_grad for p in system.discriminator.parameters())
