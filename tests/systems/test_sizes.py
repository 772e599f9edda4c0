"""Text-to-image at any size: training on batches of several shapes, previews per ``sampling.sizes``
entry, ``mmdiff sample --width --height``, and the one-line refusal of sizes the model cannot take."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

import mmdiff.callbacks.previews as image_callback
import mmdiff.run.training as training
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_configs import tiny_t2i_config  # noqa: E402

# (height, width) of the training batches, in turn: square, portrait, landscape.
BATCH_SHAPES = [(16, 16), (24, 16), (16, 24)]
# [width, height] of the previews: landscape, portrait, square.
PREVIEW_SIZES = [[24, 16], [16, 24], [16, 16]]


class MixedShapes(L.LightningDataModule):
    """Endless captioned batches whose image shape changes from one batch to the next (the shape of
    a bucketed stream's output), each shape a smooth pattern of its own."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seen: List[Tuple[int, int]] = []

    def _batches(self, count: int = 10_000) -> Iterator[Dict[str, object]]:
        g = torch.Generator().manual_seed(0)
        for step in range(count):
            h, w = BATCH_SHAPES[step % len(BATCH_SHAPES)]
            self.seen.append((h, w))
            coarse = torch.rand(self.batch_size, 3, 4, 4, generator=g) * 2 - 1
            image = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
            yield {"image": image, "caption": [f"a pattern {h}x{w}"] * self.batch_size,
                   "original_size": torch.tensor([[2 * h, 2 * w]] * self.batch_size),
                   "crop_top_left": torch.zeros(self.batch_size, 2, dtype=torch.long)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self._batches, 10_000), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self._batches, len(BATCH_SHAPES)), batch_size=None)


class _Batches(IterableDataset):
    def __init__(self, batches, count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self) -> Iterator[Dict[str, object]]:
        return self.batches(self.count)

    def __len__(self) -> int:  # sized, as the shard stream's loaders are
        return self.count


PREVIEWS: Dict[str, List[torch.Tensor]] = {}
DATA: List[MixedShapes] = []


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    """A tiny text-to-image fit on the mixed-shape batches, with previews at three sizes."""
    tmp = tmp_path_factory.mktemp("sizes")
    config = tiny_t2i_config(
        tmp, demo_shards, run="mixed",
        model={"vae": {"pretrained": None, "block_out_channels": [32, 32], "scale_estimate_batches": 3},
               "clip": {"pretrained": None}, "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8},
               "ema_decay": 0.9},
        sampling={"prompts": ["a pattern 16x24"], "steps": 2, "every_n_steps": 3, "sizes": PREVIEW_SIZES},
        trainer={"max_steps": 6, "val_every_n_steps": 3, "limit_val_batches": 3, "checkpoint_every_n_steps": 3},
    )
    unpack = image_callback.unpack_preview

    def recording(value, default_nrow):
        images, nrow, captions = unpack(value, default_nrow)
        PREVIEWS.setdefault(f"{images.shape[-1]}x{images.shape[-2]}", []).append(images.detach().clone())
        return images, nrow, captions

    def mixed_data(cfg):
        DATA.append(MixedShapes())
        return DATA[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_callback, "unpack_preview", recording)
        patch.setattr(training, "build_datamodule", mixed_data)
        assert main(["fit", str(config)]) == 0
    return tmp / "mixed"


def test_fit_on_mixed_shape_batches_trains_with_finite_losses(trained: Path) -> None:
    import csv

    assert {shape for data in DATA for shape in data.seen} == set(BATCH_SHAPES)
    (metrics,) = trained.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    val = [float(row["val/loss"]) for row in rows if row.get("val/loss")]  # a pass over all three shapes
    assert len(val) == 2 and all(torch.isfinite(torch.tensor(val)))
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert float(ckpt["state_dict"]["latent_scale"]) > 0  # estimated over batches of three shapes


def test_previews_come_at_every_configured_size(trained: Path) -> None:
    assert sorted(PREVIEWS) == sorted(f"{w}x{h}" for w, h in PREVIEW_SIZES)
    for (width, height) in PREVIEW_SIZES:
        grids = PREVIEWS[f"{width}x{height}"]
        assert len(grids) >= 3  # steps 0, 3 and 6
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
    for bad, message in (("[[18,16]]", "sampling.sizes: width 18 is not a positive multiple of 4"),
                         ("[[16]]", r"sampling.sizes entries are \[width, height\]"),
                         ("[[16,0]]", r"sampling.sizes entries are \[width, height\]"),
                         ("[{a: 1}]", "must be a list of plain values"),
                         ("[16,16]", "'sampling.sizes' in the command line must be a list of lists, got \\[16, 16\\]")):
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
