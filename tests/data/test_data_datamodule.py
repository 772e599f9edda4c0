"""ShardDataModule end to end on one process: layouts, corrupt samples, determinism, safety."""
from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path

import pytest
import torch

from datakit import data_cfg, evil_pickle, good_keys, img2dataset_sample, sized_shards, write_tar
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.data.skips import count_skipped
from mmdiff.data.tario import iter_samples
from mmdiff.errors import DataError


def _keys_of(paths) -> list[str]:
    return [s.key for p in paths for s in iter_samples(str(p))]


@pytest.fixture
def img2dataset_shards(tmp_path: Path) -> tuple[list[Path], list[str]]:
    """Two img2dataset-layout shards: 7 good samples, one corrupt JPEG, one without caption."""
    first = [img2dataset_sample(f"00000{i:04d}", i) for i in range(4)]
    first.insert(2, ("000000099", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"corrupt"}))
    second = [img2dataset_sample(f"00001{i:04d}", 10 + i) for i in range(3)]
    second.insert(1, img2dataset_sample("000010099", 99, caption=False))
    paths = [write_tar(tmp_path / "i2d" / "00000.tar", first), write_tar(tmp_path / "i2d" / "00001.tar", second)]
    good = [k for k, _ in first + second if k not in ("000000099", "000010099")]
    return paths, good


@pytest.mark.timeout(120)
def test_acceptance_a_every_good_sample_once_bad_ones_counted(small_demo, img2dataset_shards) -> None:
    i2d_paths, i2d_good = img2dataset_shards
    val = [str(p) for p in small_demo["val"]] + [str(i2d_paths[0].parent / "{00000..00001}.tar")]
    train = [str(small_demo["train"][0].parent / "train-*.tar"), *map(str, i2d_paths)]
    dm = ShardDataModule(data_cfg(train_shards=train, val_shards=val, num_workers=2, val_batch_size=32), seed=0)
    dm.setup("fit")
    expected = _keys_of(small_demo["val"]) + i2d_good
    loader = dm.val_dataloader()
    passes = []
    for _ in range(2):
        batches = list(loader)
        keys = good_keys(batches)
        assert Counter(keys) == Counter(expected)  # every good sample exactly once
        assert count_skipped(batches) == 2  # the corrupt JPEG and the missing caption
        assert len(batches) == len(loader)
        img = torch.cat([b["image"][b["valid"]] for b in batches])
        assert img.shape[1:] == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
        passes.append(keys)
    assert passes[0] == passes[1]  # deterministic order too

    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(b["image"].shape == (8, 3, 32, 32) for b in batches)
    assert {int(b["worker"][0]) for b in batches} == {0, 1}


def _first_batches(cfg, seed: int, n_passes: int = 1):
    dm = ShardDataModule(cfg, seed=seed)
    loader = dm.train_dataloader()
    return [[k for b in loader for k in b["key"]] for _ in range(n_passes)]


def test_training_is_seeded_per_epoch(small_demo) -> None:
    cfg = data_cfg(train_shards=[str(p) for p in small_demo["train"]], num_workers=2, crop="random",
                   random_flip=True, steps_per_epoch=3)
    a = _first_batches(cfg, seed=1, n_passes=2)
    b = _first_batches(cfg, seed=1, n_passes=2)
    c = _first_batches(cfg, seed=2)
    assert a == b  # same seed, same batches, epoch by epoch
    assert a[0] != a[1]  # a new epoch is a new draw
    assert a[0] != c[0]
    dm = ShardDataModule(cfg, seed=1)
    images = [next(iter(dm.train_dataloader()))["image"] for _ in range(1)]
    dm2 = ShardDataModule(cfg, seed=1)
    assert torch.equal(images[0], next(iter(dm2.train_dataloader()))["image"])  # augmentations too


def test_epochs_continue_each_workers_stream(tmp_path: Path) -> None:
    paths = sized_shards(tmp_path, [8, 8])
    cfg = data_cfg(train_shards=[str(p) for p in paths], num_workers=2, batch_size=2, steps_per_epoch=4,
                   shuffle_buffer=0)
    dm = ShardDataModule(cfg, seed=0)
    loader = dm.train_dataloader()
    epochs = [[k for b in loader for k in b["key"]] for _ in range(2)]
    assert sorted(epochs[0] + epochs[1]) == sorted(_keys_of(paths))  # no restart at shard starts
    assert dm.state_dict() == {"next_train_epoch": 2}


def test_resumed_stream_is_seeded_by_the_saved_epoch(small_demo) -> None:
    cfg = data_cfg(train_shards=[str(p) for p in small_demo["train"]], steps_per_epoch=2)
    first = [k for b in ShardDataModule(cfg, seed=0).train_dataloader() for k in b["key"]]
    resumed = []
    for _ in range(2):
        dm = ShardDataModule(cfg, seed=0)
        dm.load_state_dict({"next_train_epoch": 5})
        resumed.append([k for b in dm.train_dataloader() for k in b["key"]])
        assert dm.state_dict() == {"next_train_epoch": 6}
    assert resumed[0] == resumed[1] != first
    loader = ShardDataModule(cfg, seed=0).train_dataloader()  # Lightning saves the loader's state too
    loader.load_state_dict({"next_train_epoch": 5})
    assert [k for b in loader for k in b["key"]] == resumed[0]
    assert loader.state_dict() == {"next_train_epoch": 6}


def test_pipe_urls_and_json_captions(tmp_path: Path) -> None:
    paths = sized_shards(tmp_path, [6, 5])
    pipes = [f"pipe:cat {shlex.quote(str(p))}" for p in paths]
    cfg = data_cfg(train_shards=pipes, val_shards=pipes, caption_key="json:caption", batch_size=4)
    dm = ShardDataModule(cfg, seed=0)
    dm.setup("fit")
    assert dm.val_sizes == [6, 5]
    batches = list(dm.val_dataloader())
    assert sorted(good_keys(batches)) == sorted(_keys_of(paths))
    assert all(c.startswith("a random picture number") for b in batches for c in b["caption"])
    assert len(list(dm.train_dataloader())) == 4

    bad = data_cfg(train_shards=["pipe:exit 3"], val_shards=["pipe:exit 3"])
    with pytest.raises(DataError, match="data.val_shards"):
        ShardDataModule(bad).setup("validate")
    bad.num_workers = 2  # the worker's DataError comes back as itself, one sentence
    with pytest.raises(DataError, match=r"^training rank 0 worker \d read no samples .*num_workers\.$"):
        list(ShardDataModule(bad).train_dataloader())


def test_pickle_member_in_a_shard_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = evil_pickle(marker)
    key, members = img2dataset_sample("000000000", 0)
    members.update({"pyd": payload, "pickle": payload, "pth": payload})
    shard = write_tar(tmp_path / "evil.tar", [(key, members)])
    cfg = data_cfg(train_shards=[str(shard)], val_shards=[str(shard)], batch_size=1, steps_per_epoch=2)
    dm = ShardDataModule(cfg)
    dm.setup("fit")
    batches = list(dm.val_dataloader()) + list(dm.train_dataloader())
    assert good_keys(batches) == [key] * 3 and set(batches[0]) == {
        "image", "original_size", "crop_top_left", "caption", "key", "valid", "skipped", "worker"}
    assert not marker.exists()


def test_truncated_tar_member_is_skipped_and_counted(tmp_path: Path) -> None:
    whole = sized_shards(tmp_path, [5])[0]
    data = whole.read_bytes()
    cut = data.index(b"000000004.jpg") + 512 + 100  # into the last sample's image
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[:cut])
    dm = ShardDataModule(data_cfg(train_shards=[str(broken)], val_shards=[str(broken)], batch_size=2,
                                  val_batch_size=2, num_workers=2))
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert good_keys(val) == _keys_of([whole])[:4] and count_skipped(val) == 1
    train = list(dm.train_dataloader())  # keeps going: resamples the readable part
    assert len(train) == 4 and count_skipped(train) >= 1


def test_shard_spec_errors_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ShardDataModule(data_cfg(train_shards=[str(tmp_path / "x-{0..1}.tar")])).setup("fit")
    with pytest.raises(DataError, match="no shard matches"):
        ShardDataModule(data_cfg(train_shards=[str(tmp_path / "*.tar")])).setup("fit")
    with pytest.raises(DataError, match="is empty"):
        ShardDataModule(data_cfg(train_shards=[])).setup("fit")
    assert ShardDataModule(data_cfg(train_shards=[])).val_dataloader() == []


def test_rank_and_world_from_environment(tmp_path: Path, monkeypatch) -> None:
    paths = sized_shards(tmp_path, [3, 4, 5, 6])
    keys = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ShardDataModule(data_cfg(train_shards=[str(p) for p in paths], val_shards=[str(p) for p in paths],
                                      val_batch_size=4), seed=0)
        keys[rank] = {k for b in dm.train_dataloader() for k in b["key"]}
        val = list(dm.val_dataloader())
        keys[f"val{rank}"] = good_keys(val)
        assert len(val) == 3  # ceil(9 / 4): both ranks pad to 9 samples
    assert not keys[0] & keys[1]
    assert sorted(keys["val0"] + keys["val1"]) == sorted(_keys_of(paths))


def test_npy_arrays_ride_along_and_placeholders_keep_their_shape(tmp_path: Path) -> None:
    import io

    import numpy as np

    def npy(value: float) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.full((4, 2, 2), value, dtype=np.float32))
        return buf.getvalue()

    samples = [(f"{i:03d}", {"latent.npy": npy(i), "txt": f"caption {i}".encode()}) for i in range(5)]
    samples[2] = ("002", {"latent.npy": b"not npy", "txt": b"broken"})
    shard = write_tar(tmp_path / "latents.tar", samples)
    cfg = data_cfg(train_shards=[str(shard)], val_shards=[str(shard)], load_images=False, array_keys=["latent"],
                   batch_size=2, val_batch_size=5)
    dm = ShardDataModule(cfg)
    (val,) = list(dm.val_dataloader())
    assert "image" not in val and val["latent"].shape == (5, 4, 2, 2)
    assert val["valid"].tolist() == [True, True, False, True, True]
    assert val["latent"][:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 3.0, 4.0]
    assert next(iter(dm.train_dataloader()))["latent"].shape == (2, 4, 2, 2)
