"""Helpers for the data tests: hand-made tar shards (img2dataset layout, corrupt members, ...)."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from mmdiff.config import DataConfig


def image_bytes(seed: int, size: Tuple[int, int] = (40, 30), fmt: str = "JPEG") -> bytes:
    """A small random RGB image encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: Iterable[Tuple[str, Mapping[str, bytes]]]) -> Path:
    """Write ``(key, {ext: bytes})`` samples as ``key.ext`` members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_sample(key: str, seed: int, caption: bool = True) -> Tuple[str, Dict[str, bytes]]:
    """``key.jpg``, ``key.txt``, ``key.json`` as img2dataset writes them."""
    text = f"a random picture number {seed}"
    members: Dict[str, bytes] = {"jpg": image_bytes(seed)}
    if caption:
        members["txt"] = text.encode()
    members["json"] = json.dumps({"caption": text, "key": key, "status": "success"}).encode()
    return key, members


def sized_shards(root: Path, sizes: List[int], prefix: str = "part") -> List[Path]:
    """Shards with the given numbers of good img2dataset-layout samples; keys unique overall."""
    paths, n = [], 0
    for shard, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            samples.append(img2dataset_sample(f"{shard:04d}{n:05d}", n))
            n += 1
        paths.append(write_tar(root / f"{prefix}-{shard:06d}.tar", samples))
    return paths


def data_cfg(**overrides) -> DictConfig:
    """A typed ``data:`` config for tests (small batches, 32 px)."""
    base = {"image_size": 32, "batch_size": 8, "val_batch_size": 16, "num_workers": 0,
            "steps_per_epoch": 4, "shuffle_buffer": 50}
    base.update(overrides)
    return OmegaConf.merge(OmegaConf.structured(DataConfig), base)


def good_keys(batches) -> List[str]:
    """Keys of the valid samples of some batches, in order."""
    return [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]


class _Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def mixed_aspect_shards(root: Path, n: int, shards: int = 3,
                        seed: int = 0) -> Tuple[List[Path], Dict[str, Tuple[int, int]]]:
    """``n`` samples of many shapes — portrait, landscape, square and tiny (down to 6 px), JPEG and
    PNG — spread over ``shards`` shards; returns the paths and each key's (width, height)."""
    rng = np.random.default_rng(seed)
    kinds = [(24, 64, 48, 96), (48, 96, 24, 64), (30, 60, 30, 60), (6, 16, 6, 16)]  # w range, h range
    per_shard: List[List[Tuple[str, Dict[str, bytes]]]] = [[] for _ in range(shards)]
    sizes: Dict[str, Tuple[int, int]] = {}
    for i in range(n):
        w0, w1, h0, h1 = kinds[i % len(kinds)]
        width, height = int(rng.integers(w0, w1 + 1)), int(rng.integers(h0, h1 + 1))
        if i % len(kinds) == 2:
            height = width  # the squares
        key = f"{i:06d}"
        fmt = "PNG" if i % 3 == 0 else "JPEG"
        members = {fmt.lower().replace("jpeg", "jpg"): image_bytes(i, (width, height), fmt),
                   "txt": f"picture {i}".encode()}
        per_shard[i % shards].append((key, members))
        sizes[key] = (width, height)
    paths = [write_tar(root / f"mixed-{s:06d}.tar", samples) for s, samples in enumerate(per_shard)]
    return paths, sizes
