"""Aspect-ratio buckets: the bucket set, one-shape training batches, the assignment and its histogram,
balanced validation that sees every sample once, crop bookkeeping, and the config's refusals."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from datakit import data_cfg, good_keys, image_bytes, mixed_aspect_shards, write_tar
from mmdiff.config import load_config
from mmdiff.config.bucket_spec import generated_sizes
from mmdiff.data.buckets import BucketSet, ShapeBuffers
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.data.skips import count_skipped
from mmdiff.data.splitting import val_batches_per_slot
from mmdiff.data.transforms import ImageTransform
from mmdiff.errors import ConfigError

# data.image_size 32 with step 8: sides multiple of 8, area <= 32², aspect <= 2, worked out by hand.
BUCKETS = [(24, 40), (32, 32), (40, 24)]
DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "text_to_image.yaml")
ON = {"enabled": True, "step": 8}


def _expected_bucket(width: int, height: int) -> Tuple[int, int]:
    """The nearest bucket in log-aspect, computed here from the image's own size."""
    return min(BUCKETS, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Tuple[List[Path], Dict[str, Tuple[int, int]]]:
    return mixed_aspect_shards(tmp_path_factory.mktemp("mixed"), 400, shards=4)


def test_generated_sets() -> None:
    assert generated_sizes(32 * 32, 8, 2.0) == BUCKETS
    sdxl = generated_sizes(1024 * 1024, 64, 2.0)  # SDXL's own list at this aspect range
    assert sdxl == [(768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1088, 960),
                    (1152, 896), (1216, 832), (1344, 768)]
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 ** 2 for w, h in sdxl)
    assert BucketSet(BUCKETS).nearest(height=100, width=10) == (24, 40)  # beyond the range: the extreme
    assert BucketSet(BUCKETS).squarest == (32, 32)


def test_shape_buffers_emit_the_buffer_that_fills() -> None:
    buffers: ShapeBuffers[int] = ShapeBuffers(2)
    assert buffers.add("a", 1) is None and buffers.add("b", 2) is None
    assert buffers.add("a", 3) == [1, 3] and buffers.pending() == [2] and len(buffers) == 1
    assert buffers.drain() == [[2]] and len(buffers) == 0


def test_training_batches_have_one_shape_and_the_histogram_matches(mixed) -> None:
    paths, sizes = mixed
    cfg = data_cfg(train_shards=[str(p) for p in paths], buckets=ON, batch_size=4, num_workers=2,
                   steps_per_epoch=100, shuffle_buffer=10, crop="random", random_flip=True)
    batches = list(ShardDataModule(cfg, seed=0).train_dataloader())
    assert len(batches) == 100  # 400 samples: one pass over the data
    seen: Counter = Counter()
    for batch in batches:
        height, width = batch["image"].shape[2:]
        assert (width, height) in BUCKETS and batch["image"].shape[0] == 4
        for key, original, (top, left) in zip(batch["key"], batch["original_size"].tolist(),
                                              batch["crop_top_left"].tolist()):
            w, h = sizes[key]
            assert (width, height) == _expected_bucket(w, h), key  # every sample in its own bucket
            assert original == [h, w]
            scale = max(width / w, height / h)  # resized to cover, then cropped inside it
            assert 0 <= top <= round(h * scale) - height and 0 <= left <= round(w * scale) - width
            seen[(width, height)] += 1
    direct = Counter(_expected_bucket(*sizes[k]) for k in sizes)  # the whole data set, one epoch
    assert len(seen) == len(BUCKETS)
    for bucket in BUCKETS:
        share, expected = seen[bucket] / sum(seen.values()), direct[bucket] / len(sizes)
        assert abs(share - expected) <= 0.02, (bucket, share, expected)


def test_no_sample_is_lost_when_a_batch_holds_a_broken_image(tmp_path: Path) -> None:
    """Pixels are decoded when a bucket's batch leaves: a truncated image (readable header) is then
    counted, and its batch-mates wait on. Every sample out of the shuffle buffer is in a batch,
    waiting, or counted."""
    paths, _ = mixed_aspect_shards(tmp_path, 30, shards=1)
    cut = image_bytes(1, (40, 60))[:1000]
    broken = write_tar(tmp_path / "cut.tar", [(f"cut{i}", {"jpg": cut, "txt": b"x"}) for i in range(6)])
    cfg = data_cfg(train_shards=[str(paths[0]), str(broken)], buckets=ON, batch_size=4, steps_per_epoch=20,
                   shuffle_buffer=0)
    loader = ShardDataModule(cfg, seed=0).train_dataloader()
    batches = list(loader)
    slot = loader.position()["slots"][0]
    skipped = int(batches[-1]["skipped"][0])
    assert skipped >= 6 and all("cut" not in k for b in batches for k in b["key"])
    assert slot["n_out"] == 4 * len(batches) + len(slot["waiting"]) + skipped


def test_square_config_batches_stay_square(mixed) -> None:
    paths, _ = mixed
    cfg = data_cfg(train_shards=[str(p) for p in paths], batch_size=4, steps_per_epoch=3)
    assert all(b["image"].shape == (4, 3, 32, 32) for b in ShardDataModule(cfg).train_dataloader())


def test_validation_sees_every_sample_once_over_two_ranks_and_two_workers(mixed, tmp_path: Path,
                                                                          monkeypatch) -> None:
    paths, sizes = mixed
    bad = write_tar(tmp_path / "bad.tar", [("bad000", {"jpg": b"junk", "txt": b"broken"})])
    val = [str(p) for p in paths] + [str(bad)]
    cfg = data_cfg(train_shards=val, val_shards=val, buckets=ON, val_batch_size=16, num_workers=2)
    keys, skipped, lengths = [], 0, []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ShardDataModule(cfg, seed=0)
        dm.setup("validate")
        loader = dm.val_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)  # the same count on both ranks: DDP stays in step
        lengths.append(len(batches))
        for batch in batches:
            height, width = batch["image"].shape[2:]
            for key, ok in zip(batch["key"], batch["valid"].tolist()):
                assert not ok or (width, height) == _expected_bucket(*sizes[key])
        keys += good_keys(batches)
        skipped += count_skipped(batches)
    assert lengths[0] == lengths[1] == 2 * val_batches_per_slot(401, 4, 16, len(BUCKETS))
    assert Counter(keys) == Counter(list(sizes))  # each good sample exactly once, over ranks × workers
    assert skipped == 1


def test_a_portrait_subject_stays_in_frame(tmp_path: Path) -> None:
    """A red band across the top tenth of a 1:2 portrait: a square centre crop cuts it off, the
    portrait bucket keeps it."""
    pixels = np.full((80, 40, 3), 255, dtype=np.uint8)
    pixels[:8] = (255, 0, 0)
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    shard = write_tar(tmp_path / "portrait.tar", [("p", {"png": buf.getvalue(), "txt": b"a portrait"})])

    def top_row_redness(**overrides) -> float:
        cfg = data_cfg(train_shards=[str(shard)], val_shards=[str(shard)], val_batch_size=1, **overrides)
        dm = ShardDataModule(cfg)
        dm.setup("validate")
        (batch,) = [b for b in dm.val_dataloader() if b["valid"].any()]
        image = batch["image"][0]
        return float(image[0, 0].mean() - image[1, 0].mean())  # red minus green along the top row

    assert top_row_redness() < 0.1  # square: the top of the portrait is cropped away
    assert top_row_redness(buckets=ON) > 1.5


def test_rectangular_crop_records_its_offsets() -> None:
    """Resize to cover 40×24, crop, flip: the recorded offsets locate the output in the resized image."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))  # 70 wide, 50 high
    transform = ImageTransform(32, random_crop=True, random_flip=True)
    for seed in range(6):
        out = transform.apply(img, np.random.default_rng(seed), target=(40, 24))
        assert out.image.shape == (3, 24, 40) and out.original_size == (50, 70)
        resized = img.resize((40, 29), Image.Resampling.BICUBIC)  # cover 40×24: scale max(40/70, 24/50) = 4/7
        twin = np.random.default_rng(seed)
        left, top = int(twin.integers(0, 40 - 40 + 1)), int(twin.integers(0, 29 - 24 + 1))
        flipped = twin.random() < 0.5
        crop = resized.crop((left, top, left + 40, top + 24))
        if flipped:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = 40 - left - 40
        assert out.crop_top_left == (top, left)
        expected = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(out.image, expected)


@pytest.mark.parametrize("overrides, message", [
    (["data.buckets.enabled=true"], r"^data.buckets gives no bucket: no 64-multiple sides fit an area of 1024 px"),
    (["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.area=32"], "gives no bucket"),
    (["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.sizes=[16x24,20x8]"],
     r"^data.buckets.sizes entry 20x8 must have both sides multiples of data.buckets.step=8"),
    (["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.sizes=[[16,24],[20,8]]"],
     r"^data.buckets.sizes entry 20x8 must have both sides multiples of "),
    (["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.sizes=[16]"],
     r"^data.buckets.sizes entry 16 is not a size; write 'WIDTHxHEIGHT' or \[WIDTH, HEIGHT\]"),
    (["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.sizes=[16x24,[16,24,8]]"],
     r"^data.buckets.sizes entry \[16, 24, 8\] is not a size"),
    (["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.sizes=[{a: 1}]"],
     "must be a list of plain values"),
    (["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.sizes=[16x24]",
      "data.buckets.area=512"], r"data.buckets.sizes lists the buckets, so data.buckets \(area\) would do nothing"),
    (["data.buckets.sizes=[16x24]"], r"data.buckets \(sizes\) is set but data.buckets.enabled is false"),
    (["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.max_aspect=0.5"], "max_aspect must be >= 1"),
    (["data.buckets.enabled=true", "data.buckets.step=4", "model.vae.block_out_channels=[32,32,32,32]",
      "model.vae.pretrained=null"], r"data.buckets.step 4 is not divisible by the VAE's down-sampling factor 8"),
])
def test_bucket_specs_that_cannot_work_are_one_line_errors(overrides: List[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(DEMO, overrides)
    assert "\n" not in str(err.value)


def test_a_bucketed_config_loads() -> None:
    cfg = load_config(DEMO, ["data.buckets.enabled=true", "data.buckets.step=8"])
    assert BucketSet.from_config(cfg.data).sizes == tuple(BUCKETS)


@pytest.mark.parametrize("config, overrides, message", [
    ("caption_ar.yaml", [], r"^data.buckets cannot be used with system 'captioning': it feeds every training image to the CLIP image tower"),
    ("clip.yaml", [], r"^data.buckets cannot be used with system 'contrastive'"),
    ("prior.yaml", [], r"^data.buckets cannot be used with system 'prior'"),
    ("text_to_image.yaml", ["model.image_embed_conditioning=time"],
     r"^data.buckets cannot be used with model.image_embed_conditioning=time: the unCLIP decoder"),
])
def test_systems_feeding_the_square_clip_image_tower_refuse_buckets(config: str, overrides: List[str],
                                                                   message: str) -> None:
    path = Path(DEMO).with_name(config)
    on = ["data.buckets.enabled=true", "data.buckets.step=8"]
    load_config(path, overrides)  # square: fine
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, [*overrides, *on])
    assert "\n" not in str(err.value) and "set data.buckets.enabled=false" in str(err.value)


def test_systems_without_a_clip_image_input_keep_buckets() -> None:
    on = ["data.buckets.enabled=true", "data.buckets.step=8"]
    for config in ("text_to_image.yaml", "vae.yaml"):
        assert load_config(Path(DEMO).with_name(config), on).data.buckets.enabled


def test_listed_buckets_take_both_size_spellings() -> None:
    on = ["data.buckets.enabled=true", "data.buckets.step=8"]
    for spelling in ("[16x24,[24,16],32X32]", "[[16,24],24x16,[32,32]]"):  # as sampling.sizes takes them
        cfg = load_config(DEMO, [*on, f"data.buckets.sizes={spelling}"])
        assert BucketSet.from_config(cfg.data).sizes == ((16, 24), (32, 32), (24, 16))
