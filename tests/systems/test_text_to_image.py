"""The text-to-image system end to end at toy size: train, log to W&B, sample, resume, errors."""
from __future__ import annotations

import sys
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import mmdiff.callbacks.previews as image_callback
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.systems.text_to_image import TextToImageSystem

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_configs import tiny_t2i_config  # noqa: E402
from wandb_offline import read_run  # noqa: E402
from accelerator_sim import Float64OnDevice  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def tiny_t2i(tmp_path: Path, shards: Path, **trainer) -> Path:
    """The shared toy config with W&B logging, 2 prompts and previews/checkpoints every 3 steps."""
    return tiny_t2i_config(
        tmp_path, shards, run="t2i",
        data={"batch_size": 8, "steps_per_epoch": 4},
        sampling={"prompts": ["a handwritten digit one", "a handwritten digit two"], "every_n_steps": 3},
        trainer={"max_steps": 6, "val_every_n_steps": 3, "checkpoint_every_n_steps": 3, **trainer},
        logger={"kind": "wandb"},
    )


PREVIEWS: list = []  # the image batches the preview callback turned into grids in `trained`


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    tmp = tmp_path_factory.mktemp("t2i")
    grid = image_callback.grid

    def recording_grid(images: torch.Tensor, nrow: int = 8):
        PREVIEWS.append(images.detach().clone())
        return grid(images, nrow=nrow)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_callback, "grid", recording_grid)
        assert main(["fit", str(tiny_t2i(tmp, demo_shards))]) == 0  # model.vae.scaling_factor: null
    return tmp / "t2i"


def test_previews_from_step_0_on_are_finite_and_not_flat(trained: Path) -> None:
    assert len(PREVIEWS) >= 3  # steps 0, 3 and 6
    for images in PREVIEWS:
        assert torch.isfinite(images).all() and float(images.std()) > 0.01
    first = np.asarray(Image.open(trained / "samples" / "samples_step0000000.png"), dtype=np.float32)
    tile = first[2:18, 2:18]  # the first 16-px image inside the grid's 2-px white padding
    assert tile.std() > 1.0


def _tiny_system(tmp_path: Path, shards: Path) -> TextToImageSystem:
    system = TextToImageSystem(load_config(tiny_t2i_config(tmp_path, shards)))
    system.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)  # all_gather on one device
    system.cfg.model.vae.scale_estimate_batches = 3
    return system


def _latent_batches(device: str = "cpu") -> list:
    # A large mean and a small spread: sums of squares in float32 would lose the spread.
    g = torch.Generator().manual_seed(0)
    return [(50 + 0.5 * torch.randn(8, 4, 8, 8, generator=g)).to(device) for _ in range(4)]


def test_latent_scale_estimate_is_accurate(tmp_path: Path, demo_shards: Path, monkeypatch) -> None:
    system = _tiny_system(tmp_path, demo_shards)
    monkeypatch.setattr(system, "_raw_latents", lambda batch, sample=True: batch)  # batches are latents
    batches = _latent_batches()
    system._estimate_latent_scale(batches)
    expected = 1 / float(torch.cat([z.flatten() for z in batches[:3]]).double().std(unbiased=False))
    assert float(system.latent_scale) == pytest.approx(expected, rel=1e-6)


def test_latent_scale_estimate_makes_no_float64_on_the_device(tmp_path: Path, demo_shards: Path,
                                                               monkeypatch) -> None:
    system = _tiny_system(tmp_path, demo_shards).to("meta")  # meta stands in for MPS/CUDA
    monkeypatch.setattr(system, "_raw_latents", lambda batch, sample=True: batch)
    with Float64OnDevice() as guard:
        system._estimate_latent_scale(_latent_batches("meta"))
    assert guard.made == []


def test_wandb_offline_run_holds_config_losses_and_grids(trained: Path) -> None:
    (run,) = (trained / "wandb").glob("offline-run-*")
    logged = read_run(run)
    assert logged["config"]["system"] == "text_to_image"
    assert logged["exit_code"] == 0  # finished, not left open
    assert logged["config"]["model"]["unet"]["block_out_channels"] == [32, 32]
    losses = [h["train/loss"] for h in logged["history"] if "train/loss" in h]
    assert len(losses) >= 5 and all(torch.isfinite(torch.tensor(losses)))
    grids = [h for h in logged["history"] if "images/samples._type" in h]
    assert len(grids) >= 2
    assert len(list((run / "files" / "media" / "images").rglob("*.png"))) >= 2
    assert len(list((trained / "samples").glob("samples_step*.png"))) >= 2


def test_checkpoint_holds_ema_and_latent_scale(trained: Path) -> None:
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    ema = ckpt["callbacks"]["EMA"]
    assert ema["num_updates"] == 6
    assert float(ckpt["state_dict"]["latent_scale"]) > 0
    unet = [v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")]
    assert len(ema["shadow"]) == len(unet)


def test_resume_restores_step_ema_and_optimizer(tmp_path: Path, demo_shards: Path) -> None:
    config = tiny_t2i(tmp_path, demo_shards, max_steps=3)
    assert main(["fit", str(config)]) == 0
    first = torch.load(tmp_path / "t2i" / "checkpoints" / "last.ckpt", weights_only=True)
    assert main(["fit", str(config), "trainer.max_steps=6", "--resume", "last"]) == 0
    second = torch.load(tmp_path / "t2i" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (first["global_step"], second["global_step"]) == (3, 6)
    assert second["callbacks"]["EMA"]["num_updates"] == 6  # continued, not restarted
    assert second["lr_schedulers"][0]["last_epoch"] == 6
    assert second["optimizer_states"][0]["state"][0]["step"] == 6
    assert first["state_dict"]["latent_scale"] == second["state_dict"]["latent_scale"]


def test_sample_cli_writes_pngs_in_prompt_order(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    code = main(["sample", str(trained / "checkpoints" / "last.ckpt"), "--prompt", "a handwritten digit one",
                 "--prompt", "a handwritten digit two", "--n", "3", "--steps", "2", "--out", str(out),
                 "--sampler", "ddim"])
    assert code == 0
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:04d}.png" for i in range(6)]
    assert (out / "grid.png").is_file()


def test_sample_is_seeded(trained: Path) -> None:
    from mmdiff.inference.api import load

    system = load(trained / "checkpoints" / "last.ckpt", expect="text_to_image", device="cpu")
    a = system.sample(["a handwritten digit one"], seed=3, steps=2)
    b = system.sample(["a handwritten digit one"], seed=3, steps=2)
    assert torch.equal(a, b) and a.shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "3"], "no prompts given"),
        (["--prompt", "x", "--n", "0"], "argument --n: must be a positive number"),
        (["--prompt", "x", "--steps", "0"], "argument --steps: steps must be a positive whole number, got 0"),
    ],
)
def test_sample_bad_arguments(trained: Path, args, message, capsys) -> None:
    assert main(["sample", str(trained / "checkpoints" / "last.ckpt"), *args]) == 2
    assert message in capsys.readouterr().err


def test_sample_refuses_wrong_system_and_missing_file(tmp_path: Path, capsys) -> None:
    from mmdiff.config import load_config, to_container

    wrong = tmp_path / "vae.ckpt"
    cfg = load_config(REPO / "configs/demo/vae.yaml")
    torch.save({"state_dict": {}, "hyper_parameters": {"config": to_container(cfg)}}, wrong)
    assert main(["sample", str(wrong), "--prompt", "x"]) == 1
    assert "is a 'autoencoder' checkpoint; this command needs a 'text_to_image' one" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing.ckpt"), "--prompt", "x"]) == 1
    assert "missing.ckpt" in capsys.readouterr().err


def test_missing_vae_checkpoint_is_one_line_error(tmp_path: Path, demo_shards: Path, capsys) -> None:
    config = tiny_t2i(tmp_path, demo_shards)
    assert main(["fit", str(config), f"model.vae.pretrained={tmp_path}/no_vae.ckpt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_vae.ckpt" in err[0]


def test_wandb_previews_are_captioned_per_prompt_with_a_table(trained: Path) -> None:
    """Each preview step: one image per prompt captioned with it, and a Table of step/prompt/image."""
    (run,) = (trained / "wandb").glob("offline-run-*")
    logged = read_run(run)
    history = logged["history"]
    prompts = ["a handwritten digit one", "a handwritten digit two"]
    captioned = [h for h in history if "previews/samples.captions" in h]
    assert len(captioned) >= 2 and all(h["previews/samples.captions"] == prompts for h in captioned)
    assert all(h["previews/samples.count"] == 2 for h in captioned)  # one image per prompt
    tables = [h for h in history if h.get("previews/samples_table._type") == "table-file"]
    assert [h["trainer/global_step"] for h in tables] == [h["trainer/global_step"] for h in captioned]
    table = json.loads((run / "files" / tables[-1]["previews/samples_table.path"]).read_text())
    assert table["columns"] == ["step", "caption", "image"]
    assert [row[:2] for row in table["data"]] == [[tables[-1]["trainer/global_step"], p] for p in prompts]
    # W&B keeps a Table's images in a run_table artifact beside it: one PNG per prompt and step.
    stored = [a for a in logged["artifacts"] if a["type"] == "run_table"]
    assert len(stored) == len(tables)
    assert all(sum(f.endswith(".png") for f in a["files"]) == 2 for a in stored)
