"""img2dataset's layout: a folder of its shards (tars + parquet + stats, failed samples absent) reads
as is, and ``mmdiff shards folder --layout img2dataset`` writes the same layout."""
from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from pathlib import Path
from typing import Dict, List

import pytest
from PIL import Image

from datakit import data_cfg, good_keys, image_bytes, write_tar
from mmdiff.cli import main
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.errors import DataError

META_FIELDS = {"url", "caption", "key", "status", "error_message", "width", "height", "original_width",
               "original_height", "exif", "sha256"}


def _img2dataset_folder(root: Path) -> List[str]:
    """Two shards as img2dataset writes them (5-digit shard ids, keys shard id + 4-digit index,
    indented json with an extra 'aesthetic' column); every 4th input row failed and is absent."""
    keys = []
    for shard in range(2):
        samples, status = [], {"success": 0, "failed_to_download": 0}
        for i in range(10):
            key = f"{shard:05d}{i:04d}"
            if i % 4 == 3:
                status["failed_to_download"] += 1
                continue
            status["success"] += 1
            data, caption = image_bytes(shard * 10 + i, (48, 32)), f"picture {shard} {i}"
            meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                    "error_message": None, "width": 48, "height": 32, "original_width": 480,
                    "original_height": 320, "exif": "{}", "sha256": hashlib.sha256(data).hexdigest(),
                    "aesthetic": 4.0 + i / 2}
            samples.append((key, {"jpg": data, "txt": caption.encode(), "json": json.dumps(meta, indent=4).encode()}))
            keys.append(key)
        write_tar(root / f"{shard:05d}.tar", samples)
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by mmdiff PAR1")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": 10, "successes": status["success"], "failed_to_download": status["failed_to_download"],
            "failed_to_resize": 0, "duration": 1.5, "start_time": 0.0, "end_time": 1.5, "status_dict": status,
        }, indent=4))
    return keys


def test_an_img2dataset_folder_reads_as_is(tmp_path: Path, caplog) -> None:
    keys = _img2dataset_folder(tmp_path / "laion")
    folder = str(tmp_path / "laion")
    with caplog.at_level(logging.INFO, logger="mmdiff.data.shards"):
        dm = ShardDataModule(data_cfg(train_shards=[folder], val_shards=[folder], image_size=16, val_batch_size=4))
        dm.setup("fit")
    assert dm.train_urls == [str(tmp_path / "laion" / f"{s:05d}.tar") for s in range(2)]
    assert "made by img2dataset: 16 of 20 samples downloaded" in caplog.text
    assert sorted(good_keys(dm.val_dataloader())) == sorted(keys)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16) and set(batch["key"]) <= set(keys)
    # its extra columns filter as any json field
    strict = ShardDataModule(data_cfg(val_shards=[folder], image_size=16, filters=["aesthetic >= 7"]))
    strict.setup("validate")
    assert sorted(good_keys(strict.val_dataloader())) == sorted(k for k in keys if int(k[-4:]) >= 6)


def test_a_folder_without_tars_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.train_shards: folder '.*empty' holds no .tar shards"):
        ShardDataModule(data_cfg(train_shards=[str(tmp_path / "empty")])).setup("fit")


def _members(tar_path: Path) -> Dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_folder_writes_img2dataset_layout(tmp_path: Path, caplog) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(5):
        (src / f"p{i}.png").write_bytes(image_bytes(i, (20 + i, 30), fmt="PNG"))
        (src / f"p{i}.txt").write_text(f"photo {i}")
    (src / "p5.jpg").write_bytes(b"not an image")
    (src / "p5.txt").write_text("broken")
    (src / "p6.png").write_bytes(image_bytes(6, fmt="PNG"))  # no caption: left out
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["shards", "folder", str(src), str(out), "--layout", "img2dataset", "--shard-size", "4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]
    assert "pyarrow is not installed" in caplog.text
    stats = [json.loads((out / f"{s:05d}_stats.json").read_text()) for s in range(2)]
    assert [(s["count"], s["successes"], s["failed_to_resize"]) for s in stats] == [(4, 4, 0), (2, 1, 1)]
    assert stats[1]["status_dict"] == {"success": 1, "UnidentifiedImageError": 1}
    first = _members(out / "00000.tar")
    assert sorted(first) == sorted(f"00000{i}.{ext}" for i in range(4) for ext in ("png", "txt", "json"))
    meta = json.loads(first["000002.json"])
    assert set(meta) == META_FIELDS
    assert (meta["key"], meta["caption"], meta["status"], meta["url"]) == ("000002", "photo 2", "success", "p2.png")
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (22, 30, 22, 30)
    assert meta["sha256"] == hashlib.sha256(first["000002.png"]).hexdigest()
    assert Image.open(src / "p2.png").size == (22, 30)
    assert sorted(_members(out / "00001.tar")) == ["000010.json", "000010.png", "000010.txt"]  # p5 absent
    dm = ShardDataModule(data_cfg(val_shards=[str(out)], image_size=16), seed=0)
    dm.setup("validate")
    assert sorted(good_keys(dm.val_dataloader())) == ["000000", "000001", "000002", "000003", "000010"]


def test_a_prefix_with_img2dataset_layout_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "src").mkdir()
    code = main(["shards", "folder", str(tmp_path / "src"), str(tmp_path / "out"), "--layout", "img2dataset",
                 "--prefix", "laion"])
    assert code == 2 and "img2dataset's are named NNNNN.tar" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
