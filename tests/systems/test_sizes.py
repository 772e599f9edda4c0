"""Text-to-image at any size: a fit through the real ShardDataModule on mixed-aspect shards with
aspect-ratio buckets (one-shape batches of several shapes), previews per ``sampling.sizes`` entry,
``mmdiff sample --width --height``, and the one-line refusal of sizes the model cannot take."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from PIL import Image

import mmdiff.callbacks.previews as image_callback
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.errors import ConfigError
from mmdiff.systems.text_to_image import TextToImageSystem

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "data"))
from datakit import mixed_aspect_shards  # noqa: E402
from tiny_configs import tiny_t2i_config  # noqa: E402

# The buckets, "WxH": square, landscape, portrait (sides multiples of the tiny model's 4 px).
BUCKETS = ["16x16", "24x16", "16x24"]
# The previews, in both spellings sampling.sizes takes: landscape, portrait, square.
PREVIEW_SIZES = [[24, 16], "16x24", [16, 16]]
PREVIEW_NAMES = ["24x16", "16x24", "16x16"]

PREVIEWS: Dict[str, List[torch.Tensor]] = {}
BATCHES: List[Tuple[Tuple[int, ...], torch.Tensor]] = []  # (image shape, original sizes) per training step


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-to-image fit on mixed-aspect shards (portrait, landscape, square, tiny) through
    the real ShardDataModule with buckets on, previews at three sizes."""
    tmp = tmp_path_factory.mktemp("sizes")
    train, _ = mixed_aspect_shards(tmp / "train", n=24, shards=1, seed=0)  # one shard: every kind in turn
    val, _ = mixed_aspect_shards(tmp / "val", n=12, shards=1, seed=1)
    config = tiny_t2i_config(
        tmp, tmp, run="mixed",
        data={"train_shards": [str(p) for p in train], "val_shards": [str(p) for p in val], "batch_size": 2,
              "val_batch_size": 4, "num_workers": 0, "steps_per_epoch": 100, "image_size": 16, "shuffle_buffer": 8,
              "buckets": {"enabled": True, "step": 8, "sizes": BUCKETS}},
        sampling={"prompts": ["picture 7"], "steps": 2, "every_n_steps": 2, "sizes": PREVIEW_SIZES},
        trainer={"max_steps": 4, "val_every_n_steps": 2, "limit_val_batches": 10, "checkpoint_every_n_steps": 4},
    )
    unpack = image_callback.unpack_preview
    step = TextToImageSystem.training_step

    def recording(value, default_nrow):
        images, nrow, captions = unpack(value, default_nrow)
        PREVIEWS.setdefault(f"{images.shape[-1]}x{images.shape[-2]}", []).append(images.detach().clone())
        return images, nrow, captions

    def recording_step(self, batch, batch_idx):
        BATCHES.append((tuple(batch["image"].shape), batch["original_size"].clone()))
        return step(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_callback, "unpack_preview", recording)
        patch.setattr(TextToImageSystem, "training_step", recording_step)
        assert main(["fit", str(config)]) == 0
    return tmp / "mixed"


def test_fit_on_bucketed_shards_trains_on_one_shape_batches_of_three_shapes(trained: Path) -> None:
    import csv

    sizes = [(int(w), int(h)) for w, h in (size.split("x") for size in BUCKETS)]

    def nearest(h: int, w: int) -> Tuple[int, int]:  # the nearest aspect ratio, computed here
        return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - math.log(w / h)))

    assert len(BATCHES) == 4
    for shape, original in BATCHES:  # one bucket per batch: that of every image in it
        assert shape[:2] == (2, 3) and (shape[3], shape[2]) in sizes
        assert all(nearest(h, w) == (shape[3], shape[2]) for h, w in original.tolist())
    assert {(shape[3], shape[2]) for shape, _ in BATCHES} == set(sizes)  # all three buckets trained on
    (metrics,) = trained.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    val = [float(row["val/loss"]) for row in rows if row.get("val/loss")]  # whole passes over the bucketed val shard
    assert len(val) == 2 and all(torch.isfinite(torch.tensor(val)))
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert float(ckpt["state_dict"]["latent_scale"]) > 0  # estimated over bucketed batches


def test_previews_come_at_every_configured_size(trained: Path) -> None:
    assert sorted(PREVIEWS) == sorted(PREVIEW_NAMES)
    for width, height in ((int(w), int(h)) for w, h in (name.split("x") for name in PREVIEW_NAMES)):
        grids = PREVIEWS[f"{width}x{height}"]
        assert len(grids) >= 3  # steps 0, 2 and 4
        for images in grids:
            assert images.shape == (4, 3, height, width)
            assert torch.isfinite(images).all() and float(images.std()) > 0.01
        names = sorted(p.name for p in (trained / "samples").glob(f"samples_{width}x{height}_step*.png"))
        assert names[0] == f"samples_{width}x{height}_step0000000.png" and len(names) >= 3
    assert not list((trained / "samples").glob("samples_step*.png"))  # sizes replace the square grid


@pytest.mark.parametrize("width, height", [(24, 16), (16, 24), (16, 16)])
def test_sample_cli_writes_images_of_the_asked_size(trained: Path, tmp_path: Path, width: int, height: int) -> None:
    out = tmp_path / "out"
    assert main(["sample", str(trained / "checkpoints" / "last.ckpt"), "--prompt", "a pattern 16x24", "--n", "2",
                 "--steps", "2", "--width", str(width), "--height", str(height), "--out", str(out)]) == 0
    for name in ("0000.png", "0001.png"):
        with Image.open(out / name) as picture:
            assert picture.size == (width, height)


def test_sample_size_defaults_to_the_square_image_size(trained: Path) -> None:
    from mmdiff.inference.api import load

    system = load(trained / "checkpoints" / "last.ckpt", expect="text_to_image", device="cpu")
    assert system.sample(["x"], steps=1).shape == (1, 3, 16, 16)
    assert system.sample(["x"], steps=1, width=24).shape == (1, 3, 16, 24)


@pytest.mark.parametrize("args, message", [
    (["--width", "18"], "cannot sample 18x16: width 18 is not a positive multiple of 4"),
    (["--width", "24", "--height", "30"], "cannot sample 24x30: height 30 is not a positive multiple of 4"),
])
def test_sample_refuses_a_size_the_model_cannot_take_in_one_line(trained: Path, args, message, capsys) -> None:
    assert main(["sample", str(trained / "checkpoints" / "last.ckpt"), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_sampling_sizes_are_checked_with_the_config(tmp_path: Path, demo_shards: Path) -> None:
    config = tiny_t2i_config(tmp_path, demo_shards)
    assert load_config(config, ["sampling.sizes=[[24,16],[16,32]]"]).sampling.sizes == [[24, 16], [16, 32]]
    assert load_config(config, ["sampling.sizes=[24x16,[16,32]]"]).sampling.sizes == ["24x16", [16, 32]]
    for bad, message in (("[[18,16]]", "sampling.sizes: width 18 is not a positive multiple of 4"),
                         ("[18x16]", "sampling.sizes: width 18 is not a positive multiple of 4"),
                         ("[[16]]", r"^sampling.sizes entry \[16\] is not a size; write 'WIDTHxHEIGHT' or "),
                         ("[[16,0]]", r"^sampling.sizes entry \[16, 0\] is not a size"),
                         ("[16x]", r"^sampling.sizes entry '16x' is not a size"),
                         ("[{a: 1}]", "must be a list of plain values"),
                         ("[16,16]", r"^sampling.sizes entry 16 is not a size")):
        with pytest.raises(ConfigError, match=message):
            load_config(config, [f"sampling.sizes={bad}"])
    with pytest.raises(ConfigError, match="sampling.sizes is for text_to_image previews"):
        load_config(Path(__file__).resolve().parents[2] / "configs/demo/vae.yaml", ["sampling.sizes=[[16,16]]"])


def test_init_images_are_cover_cropped_to_the_sample_size() -> None:
    import numpy as np

    from mmdiff.data.transforms import ImageTransform
    from mmdiff.inference.sample_files import init_tensors

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    stencil = Image.fromarray(rng.integers(0, 256, (30, 50), dtype=np.uint8))
    square, mask = init_tensors(picture, stencil, 16, 16)
    assert torch.equal(square[0], ImageTransform(16)(picture))  # the square default as before
    assert torch.equal(mask[0], (ImageTransform(16)(stencil)[:1] > 0).float())
    wide, mask = init_tensors(picture, stencil, 16, 24)
    assert wide.shape == (1, 3, 16, 24) and mask.shape == (1, 1, 16, 24)
    tall, _ = init_tensors(picture, None, 24, 8)
    assert tall.shape == (1, 3, 24, 8)
