"""SDXL micro-conditioning in the data: each image's original size and crop offset, recorded by the
transform, carried by every batch (int64 B×2) and stored by ``mmdiff precompute``.

The expected values follow diffusers' ``train_text_to_image_sdxl.py``: ``original_size`` = (h, w)
before resizing; ``crop_top_left`` = (top, left) of the crop in the resized image, and with a
horizontal flip ``left = resized_width - left - crop_width``. Beyond the numbers, every case checks
the meaning: the output pixels *are* the resized image (flipped when flipped) cropped there.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from datakit import data_cfg, image_bytes, write_tar
from mmdiff.config import load_config
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.data.decode import DecodeSpec, decode_array, decode_sample
from mmdiff.data.tario import iter_samples
from mmdiff.data.transforms import ImageTransform, resize_shorter_side, to_tensor
from mmdiff.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_configs import tiny_t2i_config  # noqa: E402

SIZE = 16
# (width, height) of a source image → (width, height) after resizing the shorter side to 16, and
# the centre crop's (top, left) there, worked out by hand: e.g. 40×30 → 16/30 · 40 = 21.3 → 21×16,
# left = (21 - 16) // 2 = 2.
CASES = [
    ((40, 30), (21, 16), (0, 2)),
    ((30, 40), (16, 21), (2, 0)),
    ((59, 33), (29, 16), (0, 6)),
    ((20, 90), (16, 72), (28, 0)),
    ((16, 16), (16, 16), (0, 0)),
]
MODES = {  # ImageTransform(16, random_crop, random_flip)
    "center": (False, False),
    "center+flip": (False, True),
    "random": (True, False),
    "random+flip": (True, True),
}


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _by_recipe(resized: Tuple[int, int], centre: Tuple[int, int], random_crop: bool, random_flip: bool,
               twin: np.random.Generator) -> Tuple[Tuple[int, int], bool]:
    """(top, left) and whether flipped, drawing from ``twin`` what the transform draws."""
    width, height = resized
    top, left = centre
    if random_crop:
        left = int(twin.integers(0, width - SIZE + 1))
        top = int(twin.integers(0, height - SIZE + 1))
    flipped = random_flip and bool(twin.random() < 0.5)
    if flipped:
        left = width - left - SIZE
    return (top, left), flipped


def _crop_of(img: Image.Image, top: int, left: int, flipped: bool) -> torch.Tensor:
    """The pixels ``crop_top_left`` names: the resized image, flipped when flipped, cropped there."""
    resized = resize_shorter_side(img, SIZE)
    if flipped:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(resized.crop((left, top, left + SIZE, top + SIZE)))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("source, resized, centre", CASES)
def test_transform_records_the_diffusers_recipe(source, resized, centre, mode: str) -> None:
    random_crop, random_flip = MODES[mode]
    transform = ImageTransform(SIZE, random_crop, random_flip)
    img = _picture(*source)
    assert resize_shorter_side(img, SIZE).size == resized
    flips = set()
    for seed in range(8):  # a few draws: both flipped and unflipped crops for the flip modes
        rng, twin = np.random.default_rng(seed), np.random.default_rng(seed)
        out = transform.apply(img, rng)
        crop, flipped = _by_recipe(resized, centre, random_crop, random_flip, twin)
        flips.add(flipped)
        assert out.original_size == (source[1], source[0])
        assert out.crop_top_left == crop, f"seed {seed}"
        torch.testing.assert_close(out.image, _crop_of(img, *crop, flipped), rtol=0, atol=0)
        assert rng.random() == twin.random()  # no draw beyond the crop's and the flip's
        assert torch.equal(transform(img, np.random.default_rng(seed)), out.image)  # the old call
    assert flips == ({False, True} if random_flip else {False})


def test_flipped_offsets_in_numbers() -> None:
    """40×30 → 21×16: the centre crop starts at left 2, so its mirror image at 21 - 2 - 16 = 3."""
    img = _picture(40, 30)
    flip = ImageTransform(SIZE, random_flip=True)
    seen = {flip.apply(img, np.random.default_rng(seed)).crop_top_left for seed in range(8)}
    assert seen == {(0, 2), (0, 3)}
    assert ImageTransform(SIZE).apply(img).crop_top_left == (0, 2)  # no rng: centre, never flipped


def test_original_size_is_the_files_not_the_reduced_decode(tmp_path: Path) -> None:
    """A large JPEG is decoded at reduced scale (draft), but its original size is the file's."""
    buf = io.BytesIO()
    _picture(400, 300).save(buf, format="JPEG")
    shard = write_tar(tmp_path / "one.tar", [("k0", {"jpg": buf.getvalue(), "txt": b"a picture"})])
    raw = next(iter(iter_samples(str(shard))))
    decoded = decode_sample(raw, DecodeSpec(draft_size=SIZE))
    assert decoded.image.size[0] < 400  # the draft did reduce it
    assert decoded.original_size == (300, 400)
    out = ImageTransform(SIZE).apply(decoded.image, original_size=decoded.original_size)
    assert out.original_size == (300, 400) and out.image.shape == (3, SIZE, SIZE)


# Sizes (w, h) of the shards' images; 200×120 is a JPEG the decoder drafts to 50×30 (→ 27×16).
SOURCES = [(40, 30), (30, 40), (59, 33), (20, 90), (16, 16), (64, 64), (200, 120)]
CENTRE = {(h, w): c for (w, h), _, c in CASES} | {(64, 64): (0, 0), (120, 200): (0, 5)}  # (h, w) → (top, left)


def _shard(path: Path, n: int = 10, fmt: str = "PNG", corrupt: int = 0) -> Dict[str, Tuple[int, int]]:
    """A shard of ``n`` images of the sizes above (cycled), then ``corrupt`` unreadable ones;
    returns key → (h, w) of the good ones."""
    samples = [(f"bad{i:03d}", {"png": b"junk", "txt": b"broken"}) for i in range(corrupt)]
    sizes = {}
    for i in range(n):
        width, height = SOURCES[i % len(SOURCES)]
        key = f"{i:06d}"
        samples.append((key, {fmt.lower(): image_bytes(i, (width, height), fmt), "txt": f"image {i}".encode()}))
        sizes[key] = (height, width)
    write_tar(path, samples)
    return sizes


def test_batches_carry_sizes_and_crops(tmp_path: Path) -> None:
    sizes = _shard(tmp_path / "part-000000.tar", n=10, fmt="JPEG")
    shard = str(tmp_path / "part-000000.tar")
    _shard(tmp_path / "val-000000.tar", n=10, fmt="JPEG", corrupt=3)  # corrupt samples become placeholders
    dm = ShardDataModule(data_cfg(train_shards=[shard], val_shards=[str(tmp_path / "val-000000.tar")],
                                  image_size=SIZE, batch_size=4,
                                  val_batch_size=8, crop="random", random_flip=True, shuffle_buffer=4))
    dm.setup("fit")
    spec = dm.decode_spec()
    sources = {raw.key: decode_sample(raw, spec).image for raw in iter_samples(shard)}
    assert sources["000006"].size == (50, 30)  # the 200×120 JPEG was drafted: its sizes say 120×200
    train = [b for _, b in zip(range(3), dm.train_dataloader())]
    val = list(dm.val_dataloader())
    for batch in train + val:
        n = len(batch["key"])
        for name in ("original_size", "crop_top_left"):
            assert batch[name].dtype == torch.long and batch[name].shape == (n, 2)
    for batch in train:
        for row, key in enumerate(batch["key"]):
            assert tuple(batch["original_size"][row].tolist()) == sizes[key]
            top, left = batch["crop_top_left"][row].tolist()
            image = batch["image"][row]
            # The recorded offsets name the very pixels, in the flipped or the unflipped resized image.
            assert any(torch.equal(image, _crop_of(sources[key], top, left, flipped)) for flipped in (False, True))
    rows = [(k, ok, tuple(o), tuple(c)) for b in val
            for k, ok, o, c in zip(b["key"], b["valid"].tolist(), b["original_size"].tolist(),
                                   b["crop_top_left"].tolist())]
    assert len(rows) == 13 and sum(ok for _, ok, _, _ in rows) == 10
    for key, ok, original, crop in rows:
        if ok:  # validation: centre crops, never flipped
            assert original == sizes[key] and crop == CENTRE[original]
        else:  # padding placeholders: an uncropped image of the target size
            assert original == (SIZE, SIZE) and crop == (0, 0)


def test_array_keys_cannot_shadow_the_computed_sizes(tmp_path: Path) -> None:
    cfg = tiny_t2i_config(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"data\.array_keys lists \['crop_top_left'\]"):
        load_config(cfg, ["data.array_keys=[crop_top_left]"])


def test_stored_sizes_come_out_as_int64(tmp_path: Path) -> None:
    """Precomputed-style shards: sizes stored in any integer dtype are batched as int64."""
    samples = [(f"{i:06d}", {"txt": b"x", "latent.npy": _npy(np.zeros((2, 2), np.float16)),
                             "original_size.npy": _npy(np.array([300 + i, 400], np.int32)),
                             "crop_top_left.npy": _npy(np.array([0, i], np.int32))}) for i in range(4)]
    shard = str(write_tar(tmp_path / "pre.tar", samples))
    dm = ShardDataModule(data_cfg(train_shards=[shard], load_images=False, batch_size=4, shuffle_buffer=0,
                                  array_keys=["latent", "original_size", "crop_top_left"]))
    batch = next(iter(dm.train_dataloader()))
    assert batch["original_size"].dtype == torch.long and batch["crop_top_left"].dtype == torch.long
    assert sorted(batch["original_size"][:, 0].tolist()) == [300, 301, 302, 303]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------- precompute
@pytest.fixture(scope="module")
def precomputed(tmp_path_factory: pytest.TempPathFactory):
    """A tiny text-to-image config over shards of assorted sizes, and its precompute folder."""
    from mmdiff.jobs.precompute import precompute

    root = tmp_path_factory.mktemp("micro")
    shards = root / "shards"
    sizes = _shard(shards / "train-000000.tar", n=12, fmt="JPEG")  # with drafted JPEGs
    cfg_path = tiny_t2i_config(root, shards, data={"val_shards": []})
    out = root / "latents"
    precompute(load_config(cfg_path), out, splits=["train"], progress=False)
    return cfg_path, out, sizes


def test_precompute_stores_sizes_and_training_reads_them(precomputed) -> None:
    from mmdiff.jobs.precompute import fragment_overrides

    cfg_path, out, sizes = precomputed
    stored = {}
    for shard in sorted(out.glob("train-*.tar")):
        for raw in iter_samples(str(shard)):
            original = decode_array(raw.members["original_size.npy"])
            crop = decode_array(raw.members["crop_top_left.npy"])
            assert original.dtype == np.int64 and original.shape == (2,) and crop.dtype == np.int64
            stored[raw.key] = (tuple(original.tolist()), tuple(crop.tolist()))
    assert {k: o for k, (o, _) in stored.items()} == sizes
    assert all(crop == CENTRE[original] for original, crop in stored.values())

    cfg = load_config(cfg_path, fragment_overrides(out, "distribution", ["train"]))
    dm = ShardDataModule(cfg.data, seed=cfg.seed)
    batch = next(iter(dm.train_dataloader()))
    assert batch["original_size"].dtype == torch.long and batch["original_size"].shape == (4, 2)
    for row, key in enumerate(batch["key"]):
        assert (tuple(batch["original_size"][row].tolist()), tuple(batch["crop_top_left"][row].tolist())) == stored[key]


def test_a_folder_without_sizes_still_trains(precomputed, tmp_path: Path) -> None:
    """A folder written before the sizes were stored (format 1) trains: its batches just lack them."""
    from mmdiff.cli import main
    from mmdiff.jobs.precompute import fragment_overrides
    from mmdiff.data.precomputed import store_keys

    cfg_path, out, _ = precomputed
    old = tmp_path / "old"
    old.mkdir()
    for f in out.iterdir():
        if f.suffix != ".tar":
            (old / f.name).write_bytes(f.read_bytes())
    for shard in out.glob("train-*.tar"):
        write_tar(old / shard.name, [(raw.key, {k: v for k, v in raw.members.items() if "size" not in k
                                                 and "crop" not in k}) for raw in iter_samples(str(shard))])
    keys = [k for k in store_keys("distribution") if k not in ("original_size", "crop_top_left")]
    overrides = [o for o in fragment_overrides(old, "distribution", ["train"]) if "array_keys" not in o]
    overrides.append(f"data.array_keys=[{','.join(keys)}]")
    cfg = load_config(cfg_path, overrides)
    batch = next(iter(ShardDataModule(cfg.data, seed=cfg.seed).train_dataloader()))
    assert "original_size" not in batch and "crop_top_left" not in batch and "latent" in batch
    run = tmp_path / "run"
    assert main(["fit", str(cfg_path), f"run_dir={run}", "trainer.max_steps=2", *overrides]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
