"""Shard writers: the digits demo set and image folders / manifests."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datakit import image_bytes
from mmdiff.data.digits import digit_from_caption
from mmdiff.data.tario import iter_samples
from mmdiff.data.writers import AtomicShardWriter, write_demo_shards, write_folder_shards
from mmdiff.errors import DataError


def _samples(paths):
    return [s for p in paths for s in iter_samples(str(p))]


def test_demo_shards_counts_captions_images(small_demo) -> None:
    train, val = _samples(small_demo["train"]), _samples(small_demo["val"])
    assert len(train) + len(val) == 1797
    assert 170 <= len(val) <= 190
    assert [p.name for p in small_demo["train"]][:2] == ["train-000000.tar", "train-000001.tar"]
    assert small_demo["val"][0].name == "val-000000.tar"
    keys = [s.key for s in train + val]
    assert len(set(keys)) == len(keys) and all("." not in k and "/" not in k for k in keys)
    labels = []
    for sample in train[:300] + val:
        meta = json.loads(sample.members["json"])
        caption = sample.members["txt"].decode()
        assert meta["caption"] == caption and digit_from_caption(caption) == meta["label"]
        labels.append(meta["label"])
        img = np.asarray(Image.open(io.BytesIO(sample.members["png"])))
        assert img.shape == (16, 16) and img.dtype == np.uint8
        assert img.max() > 128 and img[0, 0] < 64  # white ink on black
    assert len({json.loads(s.members["json"])["label"] for s in val}) == 10  # stratified
    assert len({s.members["txt"] for s in train}) > 30  # several templates


def test_demo_shards_are_deterministic(small_demo, tmp_path: Path) -> None:
    again = write_demo_shards(tmp_path / "a", image_size=16, samples_per_shard=100)  # as small_demo
    for split in ("train", "val"):
        assert [p.read_bytes() for p in again[split]] == [p.read_bytes() for p in small_demo[split]]
    other = write_demo_shards(tmp_path / "b", image_size=8, samples_per_shard=1000, val_fraction=0.2, seed=4)
    assert len(_samples(other["val"])) > 300
    assert not list(tmp_path.rglob(".*tmp*"))


def _folder(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.jpg").write_bytes(image_bytes(1))
    (root / "a.txt").write_text("first picture\n")
    (root / "sub" / "b.png").write_bytes(image_bytes(2, fmt="PNG"))
    (root / "sub" / "b.txt").write_text("second picture")
    (root / "sub" / "deeper" / "c.v2.webp").write_bytes(image_bytes(3, fmt="WEBP"))
    (root / "sub" / "deeper" / "c.v2.txt").write_text("third picture")
    (root / "sub" / "nocaption.jpg").write_bytes(image_bytes(4))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (root / "broken.txt").write_text("broken")


def test_folder_shards_pack_sidecar_captions_recursively(tmp_path: Path) -> None:
    _folder(tmp_path / "src")
    paths = write_folder_shards(tmp_path / "src", tmp_path / "out", shard_size=2, progress=False)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar"]
    samples = _samples(paths)
    got = {json.loads(s.members["json"])["path"]: s for s in samples}
    assert set(got) == {"a.jpg", "sub/b.png", "sub/deeper/c.v2.webp"}  # no caption / broken: skipped
    assert got["sub/b.png"].members["txt"] == b"second picture"
    assert "webp" in got["sub/deeper/c.v2.webp"].members
    assert [s.key for s in samples] == ["00000000", "00000001", "00000002"]


def test_csv_and_jsonl_manifests(tmp_path: Path) -> None:
    _folder(tmp_path / "src")
    csv_path = tmp_path / "src" / "list.csv"
    csv_path.write_text('path,caption\na.jpg,"a caption, with a comma"\n'
                        f"{(tmp_path / 'src' / 'sub' / 'b.png').as_posix()},absolute path\n")
    paths = write_folder_shards(tmp_path / "src", tmp_path / "csv", manifest=csv_path, progress=False)
    assert [s.members["txt"] for s in _samples(paths)] == [b"a caption, with a comma", b"absolute path"]

    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"path": "src/sub/b.png", "caption": "from jsonl"}) + "\n\n")
    paths = write_folder_shards(jsonl, tmp_path / "jsonl", prefix="m", progress=False)
    assert paths[0].name == "m-000000.tar" and _samples(paths)[0].members["txt"] == b"from jsonl"


def test_manifest_naming_a_missing_file_is_a_data_error(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,caption\nnowhere.jpg,lost\n")
    with pytest.raises(DataError, match=r"line 2: image 'nowhere.jpg' does not exist"):
        write_folder_shards(tmp_path, tmp_path / "out", manifest=manifest, progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(DataError, match="path,caption"):
        (tmp_path / "bad.csv").write_text("file,text\nx,y\n")
        write_folder_shards(tmp_path, tmp_path / "out", manifest=tmp_path / "bad.csv", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        write_folder_shards(tmp_path / "missing", tmp_path / "out", progress=False)


def test_writer_leaves_no_half_written_shard_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with AtomicShardWriter(tmp_path, "x", maxcount=2) as writer:
            for i in range(3):
                writer.write({"__key__": f"{i:04d}", "txt": "hello"})
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar"]
    with tarfile.open(tmp_path / "x-000000.tar") as tar:
        assert tar.getnames() == ["0000.txt", "0001.txt"]
