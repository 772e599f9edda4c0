"""Contrastive CLIP and captioning systems at toy size: fit, W&B table, checkpoints, `mmdiff caption`."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mmdiff.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wandb_offline import read_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

TRAINER = {"max_steps": 4, "val_every_n_steps": 2, "limit_val_batches": 1, "checkpoint_every_n_steps": 2,
           "log_every_n_steps": 1, "enable_progress_bar": False}


def data(shards: Path, **more) -> dict:
    return {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
            "batch_size": 16, "val_batch_size": 24, "num_workers": 0, "steps_per_epoch": 4, **more}


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_captioner(tmp: Path, shards: Path, head: str, clip_ckpt: Path | None, **caption) -> Path:
    demo = "caption_ar.yaml" if head == "ar" else "caption_diffusion.yaml"
    cfg = {
        "base": [str(REPO / "configs/demo" / demo)],
        "run_dir": str(tmp / f"cap_{head}"),
        "model": {
            "clip": {"pretrained": str(clip_ckpt) if clip_ckpt else None},
            "caption": {"width": 32, "layers": 1, "heads": 2, "table_rows": 5, **caption},
            "ema_decay": 0.9,
        },
        "data": data(shards),
        "trainer": TRAINER,
    }
    return write(tmp / f"cap_{head}.yaml", cfg)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    tmp = tmp_path_factory.mktemp("clip")
    cfg = {"base": [str(REPO / "configs/demo/clip.yaml")], "run_dir": str(tmp / "clip"),
           "data": data(demo_shards), "trainer": TRAINER, "logger": {"kind": "csv"}}
    assert main(["fit", str(write(tmp / "clip.yaml", cfg))]) == 0
    return tmp / "clip"


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path, clip_run: Path) -> Path:
    tmp = tmp_path_factory.mktemp("cap")
    config = tiny_captioner(tmp, demo_shards, "ar", clip_run / "checkpoints" / "last.ckpt")
    assert main(["fit", str(config)]) == 0
    import wandb

    wandb.finish()  # flush the offline run file before the tests read it
    return tmp / "cap_ar"


def test_contrastive_trains_and_reports_recall(clip_run: Path) -> None:
    (metrics,) = (clip_run / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    val = [r for r in rows if r.get("val/recall@1_i2t")]
    assert len(val) == 2
    for name in ("val/recall@1_i2t", "val/recall@1_t2i", "val/recall@5_t2i", "val/zero_shot_digits", "val/loss"):
        assert 0.0 <= float(val[-1][name]) <= (1.0 if "loss" not in name else 100.0), name


def test_contrastive_checkpoint_is_a_clip(clip_run: Path) -> None:
    from mmdiff.config import load_config
    from mmdiff.models.clip import ClipEncoder
    from mmdiff.systems.contrastive import load_clip_state

    ckpt = clip_run / "checkpoints" / "last.ckpt"
    state = load_clip_state(ckpt)
    assert "logit_scale" in state and "visual.conv1.weight" in state
    cfg = load_config(REPO / "configs/demo/caption_ar.yaml",
                      [f"model.clip.pretrained={ckpt}", "model.clip.freeze=true"])
    clip = ClipEncoder.from_config(cfg.model.clip)
    assert torch.equal(clip.model.visual.conv1.weight, state["visual.conv1.weight"])
    assert clip.frozen and not any(p.requires_grad for p in clip.parameters())


def test_captioner_logs_table_and_metrics_to_wandb(ar_run: Path) -> None:
    (run,) = (ar_run / "wandb").glob("offline-run-*")
    logged = read_run(run)
    assert logged["config"]["system"] == "captioning"
    assert logged["config"]["model"]["caption"]["head"] == "ar"
    tables = [h for h in logged["history"] if h.get("val/captions._type") == "table-file"]
    assert len(tables) == 2
    path = run / "files" / tables[-1]["val/captions.path"]
    table = json.loads(path.read_text())
    assert table["columns"] == ["image", "reference", "generated"] and len(table["data"]) == 5
    assert all(isinstance(row[1], str) and isinstance(row[2], str) for row in table["data"])
    val = [h for h in logged["history"] if "val/bleu4" in h]
    assert len(val) == 2
    for name in ("val/loss", "val/cider_d", "val/exact_match", "val/digit_accuracy", "val/clip_score"):
        assert name in val[-1], name
    losses = [h["train/loss"] for h in logged["history"] if "train/loss" in h]
    assert len(losses) == 4


def test_checkpoint_round_trip_keeps_vocabulary(ar_run: Path) -> None:
    from mmdiff.inference.api import load

    ckpt = torch.load(ar_run / "checkpoints" / "last.ckpt", weights_only=True)
    ids = ckpt["hyper_parameters"]["caption_vocab"]
    assert 10 < len(ids) < 100  # the demo captions' tokens, not all 49,408
    system = load(ar_run / "checkpoints" / "last.ckpt", expect="captioning", device="cpu")
    assert system.vocab.ids.tolist() == ids
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    a = system.caption(images, decoding="topk", seed=3)
    assert a == system.caption(images, decoding="topk", seed=3) and len(a) == 2
    assert all(c.startswith("the number") for c in system.caption(images, complete="the number"))


def _png(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_caption_cli_names_bad_files_and_captions_the_rest(ar_run: Path, tmp_path: Path, capsys) -> None:
    good = [_png(tmp_path / "one.png", 0), _png(tmp_path / "two.png", 1)]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "missing.jpg"
    ckpt = ar_run / "checkpoints" / "last.ckpt"
    code = main(["caption", str(ckpt), str(good[0]), str(corrupt), str(missing), str(good[1]), "--decoding", "beam"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in good]
    assert all(len(line.split("\t")) == 2 for line in lines)
    errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert "corrupt.png" in errors[0] and "missing.jpg" in errors[1]
    # all good: exit code 0, one line per image
    assert main(["caption", str(ckpt), str(good[0]), str(good[1]), "--complete", "a handwritten"]) == 0
    out, _ = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2 and "\ta handwritten" in out


def test_caption_cli_usage_errors(ar_run: Path, tmp_path: Path, capsys) -> None:
    image = str(_png(tmp_path / "x.png", 0))
    ckpt = str(ar_run / "checkpoints" / "last.ckpt")
    assert main(["caption", ckpt, image, "--steps", "0"]) == 2
    assert "argument --steps: must be a positive number" in capsys.readouterr().err
    assert main(["caption", ckpt, image, "--denoise", "a handwritten digit one"]) == 2
    assert "denoise is for the 'masked' caption head" in capsys.readouterr().err


def test_masked_captioner_completes_denoises_and_refuses_beam(tmp_path: Path, demo_shards: Path) -> None:
    from mmdiff.config import load_config
    from mmdiff.systems.captioning import CaptioningSystem

    cfg = load_config(tiny_captioner(tmp_path, demo_shards, "masked", None))
    torch.manual_seed(0)
    system = CaptioningSystem(cfg)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    loss = system._loss(images, ["a handwritten digit one", "the digit 2", "a blurry handwritten 3"])["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    system.eval()
    for steps in (1, 4, 16):
        captions = system.caption(images, complete="a handwritten", steps=steps)
        assert all(c.startswith("a handwritten") for c in captions)
    denoised = system.generate(images, denoise="a handwritten digit seven", strength=0.3, seed=1)
    assert denoised.ids.shape == (3, 10)
    with pytest.raises(ValueError, match="beam decoding is for the 'ar' caption head"):
        system.caption(images, decoding="beam")


def test_caption_config_errors(tmp_path: Path, demo_shards: Path) -> None:
    from mmdiff.config import load_config
    from mmdiff.errors import ConfigError

    config = tiny_captioner(tmp_path, demo_shards, "masked", None)
    with pytest.raises(ConfigError, match="decoding 'beam' needs model.caption.head 'ar'"):
        load_config(config, ["model.caption.decoding=beam"])
    with pytest.raises(ConfigError, match="must be divisible by model.caption.heads"):
        load_config(config, ["model.caption.width=30", "model.caption.heads=4"])
    with pytest.raises(ConfigError, match="unknown key 'model.caption.hed'"):
        load_config(config, ["model.caption.hed=ar"])
    with pytest.raises(ConfigError, match="model.caption.head"):
        load_config(config, ["model.caption.head=coca"])


def test_eval_roundtrip_cli(monkeypatch, capsys, tmp_path: Path) -> None:
    import mmdiff.inference.api

    sys.path.insert(0, str(Path(__file__).parent))
    from test_caption_metrics import DigitSampler, JudgeCaptioner

    stand_ins = {"text_to_image": DigitSampler(), "captioning": JudgeCaptioner()}
    monkeypatch.setattr(mmdiff.inference.api, "load", lambda path, expect=None, **_: stand_ins[expect])
    assert main(["eval", "roundtrip", "t2i.ckpt", "cap.ckpt", "--n", "2", "--out", str(tmp_path)]) == 0
    assert "round trip: caption names the prompted digit" in capsys.readouterr().out
    assert (tmp_path / "roundtrip.json").is_file()
