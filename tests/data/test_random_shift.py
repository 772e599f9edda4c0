"""data.random_shift: translation augmentation drawn per sample, training only, nothing when 0."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datakit import data_cfg
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.data.transforms import ImageTransform, to_tensor

SIZE = 12


def _picture(seed: int = 0) -> Image.Image:
    """Random RGB pixels of the target size: no resize, so every output pixel names its source."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _shifted(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The window (dy, dx) away from the image's own, its uncovered part the replicated edge."""
    rows = np.clip(np.arange(SIZE) + dy, 0, SIZE - 1)
    cols = np.clip(np.arange(SIZE) + dx, 0, SIZE - 1)
    return array[rows][:, cols]


def test_shift_moves_the_image_by_at_most_n_pixels_with_edge_replication() -> None:
    picture, n = _picture(), 2
    array = np.asarray(picture)
    transform = ImageTransform(SIZE, random_shift=n)
    seen = set()
    for seed in range(120):
        out = transform.apply(picture, np.random.default_rng(seed))
        dy, dx = out.crop_top_left  # a square needs no crop: the offset is the shift itself
        assert -n <= dy <= n and -n <= dx <= n
        assert torch.equal(out.image, to_tensor(Image.fromarray(_shifted(array, dy, dx))))
        seen.add((dy, dx))
    assert len(seen) == (2 * n + 1) ** 2  # every shift in [-n, n]² occurs, (0, 0) included


def test_shift_is_deterministic_per_rng_and_comes_after_the_crop_and_flip() -> None:
    picture = _picture(1).resize((SIZE + 6, SIZE))
    plain = ImageTransform(SIZE, random_crop=True, random_flip=True)
    shifted = ImageTransform(SIZE, random_crop=True, random_flip=True, random_shift=3)
    for seed in range(10):
        a = shifted.apply(picture, np.random.default_rng(seed))
        assert torch.equal(a.image, shifted.apply(picture, np.random.default_rng(seed)).image)
        # the crop and flip draws come first and are those of the unshifted transform
        base = plain.apply(picture, np.random.default_rng(seed))
        moved = (a.crop_top_left[0] - base.crop_top_left[0], a.crop_top_left[1] - base.crop_top_left[1])
        assert max(map(abs, moved)) <= 3


def test_zero_shift_is_the_identity_and_draws_nothing() -> None:
    picture = _picture(2)
    rng, twin = np.random.default_rng(7), np.random.default_rng(7)
    out = ImageTransform(SIZE, random_shift=0).apply(picture, rng)
    assert torch.equal(out.image, to_tensor(picture)) and out.crop_top_left == (0, 0)
    assert rng.random() == twin.random()  # the stream of draws is untouched
    assert not ImageTransform(SIZE).is_random and ImageTransform(SIZE, random_shift=1).is_random
    with pytest.raises(ValueError, match="random_shift must be >= 0"):
        ImageTransform(SIZE, random_shift=-1)


def _first_batch(cfg) -> dict:
    return next(iter(ShardDataModule(cfg, seed=4).train_dataloader()))


def test_the_key_reaches_the_training_stream_only(small_demo) -> None:
    shards = [str(p) for p in small_demo["train"]]
    plain = data_cfg(train_shards=shards, val_shards=[str(p) for p in small_demo["val"]])
    shift = data_cfg(train_shards=shards, val_shards=[str(p) for p in small_demo["val"]], random_shift=3)
    dm = ShardDataModule(shift, seed=4)
    dm.train_dataloader()
    assert dm._train_stream is not None and dm._train_stream.transform.random_shift == 3
    a, b = _first_batch(plain), _first_batch(shift)
    assert a["key"] == b["key"]  # the same samples in the same order ...
    assert not torch.equal(a["image"], b["image"])  # ... moved
    assert torch.equal(b["image"], _first_batch(shift)["image"])  # by the same draws each time
    assert (a["crop_top_left"] == 0).all() and (b["crop_top_left"].abs() <= 3).all()
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    plain_dm = ShardDataModule(plain, seed=4)
    plain_dm.setup("fit")
    assert torch.equal(val["image"], next(iter(plain_dm.val_dataloader()))["image"])  # validation untouched
