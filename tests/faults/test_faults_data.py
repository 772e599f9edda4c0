"""Data faults through the real ShardDataModule: each bad sample is skipped and counted (or, for
odd-but-valid images and captions, used correctly), and the shards come out unchanged."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from datakit import data_cfg, image_bytes, write_tar
from faultkit import bomb_png, fingerprints, good, odd_images, truncate_tar
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.data.skips import count_skipped
from mmdiff.errors import DataError

pytestmark = pytest.mark.faults

LONG_CAPTION = ("a very long caption about a handwritten digit " * 300)[:10_000]


def _passes(shard: Path, **cfg) -> Tuple[Dict[str, Dict], int, List[str], int]:
    """(valid val samples by key, val skips, valid train keys of one pass, train skips)."""
    dm = ShardDataModule(data_cfg(train_shards=[str(shard)], val_shards=[str(shard)], batch_size=4,
                                  val_batch_size=4, steps_per_epoch=3, shuffle_buffer=0, **cfg), seed=0)
    dm.setup("fit")
    val = list(dm.val_dataloader())
    samples = {}
    for batch in val:
        for i, (key, ok) in enumerate(zip(batch["key"], batch["valid"].tolist())):
            if ok:
                samples[key] = {"caption": batch["caption"][i], "image": batch["image"][i]}
    train = list(dm.train_dataloader())
    train_keys = [k for b in train for k in b["key"]]
    return samples, count_skipped(val), train_keys, int(train[-1]["skipped"].max())


BAD_SAMPLES = {
    "non_image_under_image_key": {"jpg": b"<html>404 not found</html>", "txt": b"a caption"},
    "zero_byte_image": {"png": b"", "txt": b"a caption"},
    "non_utf8_caption": {"jpg": image_bytes(1), "txt": "café au lait".encode("latin-1")},
    "truncated_image": {"jpg": image_bytes(2, size=(64, 64))[:200], "txt": b"a caption"},
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_is_skipped_and_counted(tmp_path: Path, case: str) -> None:
    shard = write_tar(tmp_path / "s.tar", [good(0), good(1), ("bad", BAD_SAMPLES[case]), good(2), good(3)])
    before = fingerprints([shard])
    samples, val_skips, train_keys, train_skips = _passes(shard)
    assert sorted(samples) == ["good0000", "good0001", "good0002", "good0003"]
    assert val_skips == 1
    assert "bad" not in train_keys and len(train_keys) == 12 and train_skips >= 1
    assert fingerprints([shard]) == before


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = bomb_png()
    assert len(data) < 200_000  # tiny on disk, 50 Mpx decoded
    return write_tar(tmp_path_factory.mktemp("bomb") / "s.tar",
                     [good(0), ("bomb", {"png": data, "txt": b"a caption"}), good(1)])


def test_the_pixel_limit_defaults_agree_and_refuse_fifty_megapixels() -> None:
    from mmdiff.config import DataConfig
    from mmdiff.data.decode import DEFAULT_MAX_IMAGE_PIXELS, CorruptSample, decode_image

    assert DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS < 50_000_000
    with pytest.raises(CorruptSample, match="decompression bomb"):
        decode_image(bomb_png())


def test_fifty_megapixel_image_is_refused_by_default(bomb: Path) -> None:
    samples, val_skips, train_keys, train_skips = _passes(bomb)
    assert sorted(samples) == ["good0000", "good0001"] and val_skips == 1
    assert "bomb" not in train_keys and train_skips >= 1


@pytest.mark.parametrize("case", sorted(odd_images()))
def test_odd_image_modes_become_the_right_rgb(tmp_path: Path, case: str) -> None:
    data, ext, rgb = odd_images()[case]
    shard = write_tar(tmp_path / "s.tar", [good(0), ("odd", {ext: data, "txt": b"odd"})])
    samples, val_skips, _, _ = _passes(shard)
    assert val_skips == 0
    image = samples["odd"]["image"]  # C×H×W in [-1, 1]
    assert image.shape == (3, 32, 32)
    pixel = ((image[:, 16, 16] + 1) * 127.5).round().tolist()
    assert np.allclose(pixel, rgb, atol=3), (case, pixel, rgb)


def test_empty_and_ten_thousand_character_captions_pass_through(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "s.tar", [
        ("empty", {"jpg": image_bytes(1), "txt": b"   \n"}),
        ("long", {"jpg": image_bytes(2), "txt": LONG_CAPTION.encode()}),
        good(0),
    ])
    samples, val_skips, train_keys, _ = _passes(shard)
    assert val_skips == 0
    assert samples["empty"]["caption"] == ""  # kept: an unconditional sample, like caption dropout
    assert samples["long"]["caption"] == LONG_CAPTION  # the tokenizer truncates (test_faults_captions)
    assert {"empty", "long"} <= set(train_keys)


def test_truncated_tar_keeps_what_came_before_the_break(tmp_path: Path) -> None:
    shard = truncate_tar(write_tar(tmp_path / "s.tar", [good(i) for i in range(10)]))
    before = fingerprints([shard])
    samples, val_skips, train_keys, train_skips = _passes(shard)
    # the index stops at the break; a sample cut in half there is skipped and counted
    assert 3 <= len(samples) < 10 and val_skips <= 1
    assert sorted(samples) == [f"good{i:04d}" for i in range(len(samples))]
    assert set(train_keys) <= {f"good{i:04d}" for i in range(10)} and len(train_keys) == 12
    assert train_skips >= 1  # the broken member (or stream), once per pass over the shard
    assert fingerprints([shard]) == before


def test_missing_local_shard_is_an_error_at_setup(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "shard-000000.tar", [good(0)])
    spec = str(tmp_path / "shard-{000000..000001}.tar")
    dm = ShardDataModule(data_cfg(train_shards=[spec]), seed=0)
    with pytest.raises(DataError, match=r"shard '.*shard-000001.tar' does not exist") as err:
        dm.setup("fit")
    assert "\n" not in str(err.value) and shard.is_file()


def test_a_shard_that_disappears_mid_run_is_skipped_and_counted(tmp_path: Path) -> None:
    keep = write_tar(tmp_path / "a.tar", [good(i) for i in range(4)])
    gone = write_tar(tmp_path / "b.tar", [good(i) for i in range(10, 14)])
    dm = ShardDataModule(data_cfg(train_shards=[str(keep), str(gone)], batch_size=4, steps_per_epoch=4,
                                  shuffle_buffer=0), seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = list(loader)
    assert int(first[-1]["skipped"].max()) == 0
    gone.unlink()
    later = [b for _ in range(2) for b in loader]  # two more passes (epochs), same worker stream
    assert len(later) == 8 and all(len(b["key"]) == 4 for b in later)
    assert {k for b in later[1:] for k in b["key"]} <= {f"good{i:04d}" for i in range(4)}
    assert int(later[-1]["skipped"].max()) >= 3  # once per round that met the missing shard
    assert keep.is_file()


def test_all_shards_gone_is_one_clear_error(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "a.tar", [good(i) for i in range(4)])
    dm = ShardDataModule(data_cfg(train_shards=[str(shard)], batch_size=4, steps_per_epoch=2,
                                  shuffle_buffer=0), seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    shard.unlink()
    with pytest.raises(DataError, match="read no samples"):
        list(loader)
