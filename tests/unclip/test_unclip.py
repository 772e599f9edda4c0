"""unCLIP at toy size: the prior system, the decoder switch, init_from, slerp and the CLI."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _common(tmp: Path, shards: Path, name: str, clip: str | None) -> dict:
    return {
        "run_dir": str(tmp / name),
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "batch_size": 8, "val_batch_size": 8, "num_workers": 0, "steps_per_epoch": 4, "image_size": 16},
        "logger": {"kind": "none"},
        "trainer": {"max_steps": 2, "val_every_n_steps": 2, "limit_val_batches": 1, "checkpoint_every_n_steps": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False},
        "model": {"clip": {"pretrained": clip}, "ema_decay": 0.9},
    }


def tiny_prior(tmp: Path, shards: Path, clip: str | None, seed: int = 0) -> Path:
    cfg = _common(tmp, shards, "prior", clip)
    cfg.update(base=[str(REPO / "configs/demo/prior.yaml")], seed=seed,
               sampling={"steps": 2, "every_n_steps": 0})
    cfg["model"]["prior"] = {"width": 32, "layers": 1, "heads": 2}
    return _write(tmp / "prior.yaml", cfg)


def tiny_decoder(tmp: Path, shards: Path, clip: str | None, mode: str = "both", name: str = "decoder",
                 **model) -> Path:
    cfg = _common(tmp, shards, name, clip)
    cfg.update(base=[str(REPO / "configs/demo/text_to_image.yaml")],
               sampling={"prompts": ["a handwritten digit one"], "steps": 2, "every_n_steps": 0})
    cfg["model"].update(vae={"pretrained": None, "block_out_channels": [32, 32], "scale_estimate_batches": 1},
                        # 8 groups: with one channel per group, GroupNorm would cancel the time embedding
                        unet={"block_out_channels": [32, 32], "attention_head_dim": 8, "norm_num_groups": 8},
                        image_embed_conditioning=mode, image_embed_tokens=2, **model)
    return _write(tmp / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP saved once, so that prior and decoder share it."""
    from mmdiff.models.clip import ClipEncoder

    cfg = load_config(REPO / "configs/demo/clip.yaml")
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(ClipEncoder.from_config(cfg.model.clip).model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path, clip_file: Path) -> dict:
    tmp = tmp_path_factory.mktemp("unclip")
    assert main(["fit", str(tiny_prior(tmp, demo_shards, str(clip_file)))]) == 0
    assert main(["fit", str(tiny_decoder(tmp, demo_shards, str(clip_file)))]) == 0
    return {"prior": tmp / "prior/checkpoints/last.ckpt", "decoder": tmp / "decoder/checkpoints/last.ckpt",
            "tmp": tmp}


def _png(path: Path, value: int = 200) -> Path:
    Image.new("RGB", (20, 24), (value, 0, 255 - value)).save(path)
    return path


# ----------------------------------------------------------------------------------------- slerp
def test_slerp_ends_midpoint_and_norm() -> None:
    from mmdiff.inference.unclip import slerp

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a) and torch.allclose(path[-1], b, atol=1e-6)
    mid = path[2]
    assert math.isclose(float(torch.atan2(mid[1], mid[0])), math.pi / 4, rel_tol=1e-5)  # halfway in angle
    assert math.isclose(float(mid.norm()), 2.0, rel_tol=1e-5)  # norm interpolated linearly
    assert torch.allclose(slerp(a, a * 2, 0.5), a * 1.5)  # parallel vectors: no NaN


# ----------------------------------------------------------------------------------------- prior
def test_prior_trains_samples_and_scores(runs: dict) -> None:
    import mmdiff

    ckpt = torch.load(runs["prior"], weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["callbacks"]["EMA"]["num_updates"] == 2
    prior = mmdiff.load(runs["prior"], expect="prior", device="cpu")
    emb = prior.sample(["a handwritten digit one", "a handwritten digit two"], seed=0, candidates=2)
    assert emb.shape == (2, 64)
    assert torch.allclose(emb.norm(dim=-1), torch.full((2,), 8.0))  # scaled: unit length × √64
    assert torch.equal(emb, prior.sample(["a handwritten digit one", "a handwritten digit two"], seed=0, candidates=2))
    cos = prior.embedding_cosines(torch.zeros(2, 3, 16, 16), ["a", "b"], seed=0)
    assert set(cos) == {"prior", "text"} and cos["prior"].shape == (2,)


def test_prior_drops_text_tokens_switch(tmp_path: Path, demo_shards: Path) -> None:
    from mmdiff.systems.prior import PriorSystem

    cfg = load_config(tiny_prior(tmp_path, demo_shards, None), ["model.prior.text_tokens=false"])
    system = PriorSystem(cfg)
    assert system.prior.in_tokens is None
    loss = system._loss(torch.zeros(2, 3, 16, 16), ["a", "b"])["loss"]
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("mode", ["time", "tokens", "both"])
def test_decoder_switch_shapes(tmp_path: Path, demo_shards: Path, mode: str) -> None:
    from mmdiff.systems.text_to_image import TextToImageSystem

    system = TextToImageSystem(load_config(tiny_decoder(tmp_path, demo_shards, None, mode)))
    assert (system.image_tokens is not None) == (mode != "time")
    assert (system.unet.time_embedding.cond_proj is not None) == (mode != "tokens")
    batch = {"image": torch.rand(3, 3, 16, 16) * 2 - 1, "caption": ["a", "b", "c"]}
    cond = system.batch_condition(batch)
    assert cond["image_embed"].shape == (3, 64)
    x = torch.randn(3, 4, 8, 8)
    assert system.denoise(x, torch.tensor([5, 5, 5]), cond).shape == x.shape
    trained = {id(p) for g in system.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    if system.image_tokens is not None:
        assert all(id(p) in trained for p in system.image_tokens.parameters())
    out = system.sample(["a"], steps=2, image_embeds=cond["image_embed"][:1])
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        system.sample(["a"], steps=2, image_embeds=torch.zeros(1, 5))


def test_image_embed_dropout_zeroes_rows(tmp_path: Path, demo_shards: Path) -> None:
    from mmdiff.systems.text_to_image import TextToImageSystem

    system = TextToImageSystem(load_config(tiny_decoder(tmp_path, demo_shards, None)))
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": ["a"] * 4}
    drop = torch.tensor([True, False, True, False])
    emb = system.batch_condition(batch, image_drop=drop)["image_embed"]
    assert torch.all(emb[drop] == 0) and torch.all(emb[~drop].norm(dim=-1) > 1)
    from mmdiff.systems.image_embed import drop_mask

    torch.manual_seed(0)
    assert 0.2 < float(drop_mask(2000, 0.3).float().mean()) < 0.4
    assert drop_mask(5, 0.0) is None


def test_init_from_text_only_checkpoint_starts_where_it_was(tmp_path: Path, demo_shards: Path) -> None:
    from mmdiff.systems.text_to_image import TextToImageSystem

    t2i = TextToImageSystem(load_config(tiny_decoder(tmp_path, demo_shards, None, "none", name="t2i")))
    t2i.latent_scale.fill_(0.5)
    src = tmp_path / "t2i.ckpt"
    torch.save({"state_dict": t2i.state_dict(), "hyper_parameters": dict(t2i.hparams)}, src)
    decoder = TextToImageSystem(load_config(tiny_decoder(tmp_path, demo_shards, None, "time", init_from=str(src))))
    assert float(decoder.latent_scale) == 0.5
    cond = t2i.encode_prompts(["a", "b"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        want = t2i.denoise(x, t, cond)
        got = decoder.denoise(x, t, {**cond, "image_embed": torch.randn(2, 64)})
    assert torch.allclose(want, got, atol=1e-5)  # zero-initialised image path: same function
    with torch.no_grad():
        decoder.unet.time_embedding.cond_proj.weight.normal_()
        assert not torch.allclose(want, decoder.denoise(x, t, {**cond, "image_embed": torch.randn(2, 64)}), atol=1e-3)
    wide = tiny_decoder(tmp_path, demo_shards, None, "time", name="wide", init_from=str(src))
    with pytest.raises(CheckpointError, match="do not fit"):
        TextToImageSystem(load_config(wide, ["model.unet.block_out_channels=[32,64]"]))
    with pytest.raises(CheckpointError, match="linear .*use_linear_projection: true"):
        TextToImageSystem(load_config(wide, ["model.unet.use_linear_projection=false"]))


def test_unclip_config_errors(tmp_path: Path, demo_shards: Path) -> None:
    with pytest.raises(ConfigError, match="image_embed_dropout"):
        load_config(tiny_decoder(tmp_path, demo_shards, None), ["model.image_embed_dropout=1.5"])
    with pytest.raises(ConfigError, match="precomputed"):
        load_config(tiny_decoder(tmp_path, demo_shards, None),
                    ["model.precomputed=true", "data.load_images=false", "data.array_keys=[latent,context,pooled]"])
    with pytest.raises(ConfigError, match="text_to_image system"):
        load_config(tiny_prior(tmp_path, demo_shards, None), ["model.image_embed_conditioning=time"])
    with pytest.raises(ConfigError, match="model.prior.width"):
        load_config(tiny_prior(tmp_path, demo_shards, None), ["model.prior.width=33"])


# ----------------------------------------------------------------------------------------- CLI
def test_cli_vary_interpolate_and_two_stage_write_pngs(runs: dict, tmp_path: Path) -> None:
    image = _png(tmp_path / "src.png")
    out = tmp_path / "vary"
    assert main(["vary", str(runs["decoder"]), str(image), "--n", "3", "--steps", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    out = tmp_path / "interp"
    other = _png(tmp_path / "other.png", 20)
    assert main(["interpolate", str(runs["decoder"]), str(image), str(other), "--n", "3", "--steps", "2",
                 "--out", str(out)]) == 0
    assert len(list(out.glob("0*.png"))) == 3
    out = tmp_path / "two"
    assert main(["sample", str(runs["decoder"]), "--prior", str(runs["prior"]), "--prompt", "a handwritten digit one",
                 "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert (out / "grid.png").is_file() and len(list(out.glob("0*.png"))) == 2


def _error(capsys, argv: list) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors(runs: dict, tmp_path: Path, demo_shards: Path, capsys) -> None:
    decoder = str(runs["decoder"])
    assert "does not exist" in _error(capsys, ["vary", decoder, str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "not a readable image" in _error(capsys, ["vary", decoder, str(text)])
    assert "at least 2" in _error(capsys, ["interpolate", decoder, str(text), str(text), "--n", "1"])
    # A text-only text_to_image checkpoint is not a decoder.
    from mmdiff.systems.prior import PriorSystem
    from mmdiff.systems.text_to_image import TextToImageSystem

    plain = _save(TextToImageSystem(load_config(tiny_decoder(tmp_path, demo_shards, None, "none"))), tmp_path / "plain.ckpt")
    assert "image-embedding conditioning" in _error(capsys, ["vary", plain, str(_png(tmp_path / "x.png"))])
    assert "image-embedding conditioning" in _error(
        capsys, ["sample", plain, "--prior", str(runs["prior"]), "--prompt", "a", "--out", str(tmp_path / "o")])
    # The prior in the decoder's place, and a prior with another CLIP.
    assert "'prior' checkpoint" in _error(capsys, ["vary", str(runs["prior"]), str(tmp_path / "x.png")])
    torch.manual_seed(7)
    other = _save(PriorSystem(load_config(tiny_prior(tmp_path, demo_shards, None))), tmp_path / "other.ckpt")
    assert "different CLIP" in _error(
        capsys, ["sample", decoder, "--prior", other, "--prompt", "a", "--steps", "2", "--out", str(tmp_path / "o")])


def _save(system: torch.nn.Module, path: Path) -> str:
    """A checkpoint of an untrained system, as mmdiff.load reads it (no training run needed)."""
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, path)
    return str(path)


def test_init_from_refuses_another_clip(tmp_path: Path, demo_shards: Path, clip_file: Path) -> None:
    from mmdiff.systems.text_to_image import TextToImageSystem

    torch.manual_seed(5)  # a random CLIP, not the one in clip_file
    src = _save(TextToImageSystem(load_config(tiny_decoder(tmp_path, demo_shards, None, "none", name="t2i"))),
                tmp_path / "t2i.ckpt")
    cfg = load_config(tiny_decoder(tmp_path, demo_shards, str(clip_file), "time", init_from=src))
    with pytest.raises(CheckpointError, match="other CLIP weights than model.clip.pretrained"):
        TextToImageSystem(cfg)


def test_checkpoints_from_before_the_compile_rename_load() -> None:
    from mmdiff.config import from_container, to_container

    data = to_container(load_config(REPO / "configs/demo/text_to_image.yaml"))
    data["model"]["unet"]["compile"] = "off"
    assert from_container(data).model.unet.compile == "none"


def test_check_pair_names_embedding_sizes() -> None:
    from types import SimpleNamespace

    from mmdiff.inference.unclip import check_pair

    prior = SimpleNamespace(embed_dim=32)
    decoder = SimpleNamespace(clip=SimpleNamespace(embed_dim=64))
    with pytest.raises(CheckpointError, match="32-d .* 64-d"):
        check_pair(prior, decoder)
