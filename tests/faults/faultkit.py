"""Faulty shards, a tiny registered system for real `mmdiff fit` runs, and "nothing lost" checks."""
from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import yaml
from PIL import Image

import tiny_configs  # noqa: F401 - registers the toy system
from datakit import img2dataset_sample
from mmdiff.io.weights import safe_torch_load

Sample = Tuple[str, Dict[str, bytes]]


# ----------------------------------------------------------------------------------- images
def png(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


def raw_png(width: int, height: int, depth: int, colour_type: int, row: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB): every row is ``row``."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = zlib.compress(b"".join(b"\x00" + row for _ in range(height)), 9)
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def odd_images() -> Dict[str, Tuple[bytes, str, Tuple[int, int, int]]]:
    """name → (encoded image, member extension, expected RGB of pixel (0, 0) within ±3)."""
    grey16 = np.full((24, 24), 30000, dtype=np.uint16)  # 30000/65535 of white = 117
    palette = Image.new("P", (24, 24))
    palette.putpalette([200, 30, 10] * 256)
    clear = Image.new("P", (24, 24))
    clear.putpalette([0, 0, 0] * 256)
    cmyk = io.BytesIO()
    Image.new("CMYK", (24, 24), (0, 255, 0, 0)).save(cmyk, format="JPEG", quality=95)
    return {
        "cmyk_jpeg": (cmyk.getvalue(), "jpg", (255, 0, 255)),
        "grey16_png": (png(Image.fromarray(grey16)), "png", (117, 117, 117)),
        "rgb16_png": (raw_png(24, 24, 16, 2, np.full((24, 3), 30000, ">u2").tobytes()), "png", (117, 117, 117)),
        "palette_png": (png(palette), "png", (200, 30, 10)),
        "palette_transparent_png": (png(clear, transparency=0), "png", (255, 255, 255)),
        "rgba_png": (png(Image.new("RGBA", (24, 24), (0, 0, 0, 0))), "png", (255, 255, 255)),
        "grey_alpha_png": (png(Image.new("LA", (24, 24), (0, 0))), "png", (255, 255, 255)),
    }


def bomb_png(pixels: int = 50_000_000) -> bytes:
    """A greyscale PNG of ``pixels`` zeros: a few tens of kilobytes that decode to ``pixels`` bytes."""
    width = 10_000
    return raw_png(width, pixels // width, 8, 0, bytes(width))


# ----------------------------------------------------------------------------------- shards
def good(i: int) -> Sample:
    return img2dataset_sample(f"good{i:04d}", i)


def truncate_tar(path: Path, keep: float = 0.6) -> Path:
    """Cut a tar file inside its data (a half-downloaded shard)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def fingerprints(paths: List[Path]) -> Dict[str, str]:
    """sha256 of each file (inputs must come out of a run unchanged)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def tar_names(path: Path) -> List[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


# --------------------------------------------------------------------------------- fit runs
def toy_config(tmp_path: Path, train: List[str], val: List[str] | None = None, *, max_steps: int = 6,
               num_workers: int = 0, logger: str = "csv", **data) -> Path:
    """A `toy` experiment (tests/tiny_configs.py): batches of 4 at 16 px, checkpoints every 3 steps, CSV metrics."""
    cfg = {
        "name": "faults",
        "system": "toy",
        "run_dir": str(tmp_path / "run"),
        "data": {"train_shards": train, "val_shards": val or [], "image_size": 16, "batch_size": 4,
                 "val_batch_size": 4, "num_workers": num_workers, "steps_per_epoch": 3,
                 "shuffle_buffer": 0, **data},
        "trainer": {"max_steps": max_steps, "accelerator": "cpu", "devices": "1", "val_every_n_steps": 3,
                    "limit_val_batches": 2, "checkpoint_every_n_steps": 3, "log_every_n_steps": 1,
                    "enable_progress_bar": False},
        "logger": {"kind": logger},
    }
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_t2i_config(tmp_path: Path, shards: Path) -> Path:
    """The demo text-to-image config shrunk to seconds (random VAE and CLIP, tiny U-Net, 16 px)."""
    repo = Path(__file__).resolve().parents[2]
    cfg = {
        "base": [str(repo / "configs/demo/text_to_image.yaml")],
        "run_dir": str(tmp_path / "run"),
        "model": {"vae": {"pretrained": None, "block_out_channels": [32, 32]}, "clip": {"pretrained": None},
                  "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8}},
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "batch_size": 4, "val_batch_size": 4, "num_workers": 0, "image_size": 16},
        "logger": {"kind": "csv"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def errors(stderr: str) -> List[str]:
    """The ``error:`` lines of a command's stderr (libraries may add warnings of their own)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def metric_values(run_dir: Path, name: str) -> List[float]:
    """Every logged value of metric ``name`` in the run's CSV logs."""
    import csv

    values: List[float] = []
    for metrics in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(metrics, newline="") as f:
            values += [float(row[name]) for row in csv.DictReader(f) if row.get(name)]
    return values


def assert_checkpoints_intact(run_dir: Path, steps: int) -> None:
    """Every checkpoint loads (weights-only), ``last.ckpt`` is at ``steps``, no temp file is left."""
    folder = run_dir / "checkpoints"
    files = sorted(folder.iterdir())
    assert files, f"no checkpoints in {folder}"
    leftovers = [p.name for p in files if p.suffix != ".ckpt"]
    assert not leftovers, f"half-written files left: {leftovers}"
    for path in files:
        assert "state_dict" in safe_torch_load(path), path
    assert safe_torch_load(folder / "last.ckpt")["global_step"] == steps
