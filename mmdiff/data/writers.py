"""Shard writers: the digits demo set, and image folders / CSV / JSONL manifests.

Shards are written with webdataset's ``TarWriter``, each to a hidden temporary name in the output
folder and renamed into place only when complete, so an error or a kill never leaves a
half-written ``PREFIX-NNNNNN.tar`` behind. Keys are zero-padded counters (``00000042``): safe as
file names, free of dots (webdataset splits member names at the first dot) and of ``/``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from mmdiff.data.decode import IMAGE_EXTS
from mmdiff.data.digits import caption_for
from mmdiff.data.keys import unsafe_key_reason
from mmdiff.errors import DataError
from mmdiff.io.atomic import AtomicFile

log = logging.getLogger(__name__)

_FIXED_MTIME = 946684800.0  # 2000-01-01: reproducible tar bytes


class AtomicShardWriter:
    """Writes ``OUT/PREFIX-000000.tar``, ``-000001`` ... with at most ``maxcount`` samples each.

    Use as a context manager: on an exception the shard in progress is deleted, completed shards
    stay. Sample values are bytes or str; ``__key__`` names the sample.
    """

    def __init__(self, out_dir: str | Path, prefix: str, maxcount: int) -> None:
        if maxcount < 1:
            raise ValueError("maxcount must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.maxcount = maxcount
        self.paths: List[Path] = []
        self._writer: Optional[TarWriter] = None
        self._file: Optional[AtomicFile] = None
        self._count = 0

    def _open(self) -> None:
        final = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._file = AtomicFile(final, remove_leftovers=True)
        self._writer = TarWriter(self._file.file, encoder=False, mtime=_FIXED_MTIME)
        self._count = 0

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample (``{"__key__": str, EXT: bytes | str, ...}``)."""
        unsafe = unsafe_key_reason(str(sample.get("__key__", "")))
        if unsafe is not None:
            raise DataError(f"cannot write a sample to {self.out_dir}: {unsafe}.")
        if self._writer is None:
            self._open()
        assert self._writer is not None
        encoded = {k: (v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v)
                   for k, v in sample.items()}
        self._writer.write(encoded)
        self._count += 1
        if self._count >= self.maxcount:
            self._finish()

    def _finish(self) -> None:
        if self._writer is None:
            return
        assert self._file is not None
        self._writer.close()
        self.paths.append(self._file.commit())
        self._writer = self._file = None

    def abort(self) -> None:
        """Delete the shard in progress."""
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:
            pass
        if self._file is not None:
            self._file.discard()
        self._writer = self._file = None

    def close(self) -> List[Path]:
        """Finish the last shard; return all shard paths."""
        self._finish()
        return self.paths

    def __enter__(self) -> "AtomicShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _warn_stale(out_dir: Path, prefix: str, written: int) -> None:
    pattern = re.compile(re.escape(prefix) + r"-(\d{6})\.tar$")
    stale = sorted(p.name for p in out_dir.iterdir()
                   if (m := pattern.match(p.name)) and int(m.group(1)) >= written)
    if stale:
        log.warning("%s holds older shards not written now (%s...); delete them or they will match "
                    "'%s-*.tar' patterns", out_dir, stale[0], prefix)


# ---------------------------------------------------------------------------------- demo
def _digit_png(pixels: np.ndarray, size: int) -> bytes:
    """An 8×8 digit (0..16, ink high) as a smooth ``size``×``size`` white-on-black PNG."""
    ink = Image.fromarray((pixels.astype(np.float32) * (255.0 / 16.0)), mode="F")
    big = np.asarray(ink.resize((size, size), Image.Resampling.BICUBIC))
    out = Image.fromarray(np.clip(np.rint(big), 0, 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def _stratified_split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def write_demo_shards(
    out_dir: str | Path,
    image_size: int = 32,
    samples_per_shard: int = 200,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Dict[str, List[Path]]:
    """Write scikit-learn's 1,797 digits as ``train-NNNNNN.tar`` / ``val-NNNNNN.tar`` shards.

    Each sample: ``KEY.png`` (white ink on black, ``image_size`` square, bicubic upscaling),
    ``KEY.txt`` (a caption from :data:`mmdiff.data.digits.CAPTION_TEMPLATES`) and ``KEY.json``
    (``{"caption", "label", "index"}``). The split is stratified by digit; everything is
    deterministic in ``seed``. Returns ``{"train": [paths], "val": [paths]}``.
    """
    # Imported here: scikit-learn is slow to import; only the digits demo data needs it.
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise DataError(f"image_size must be at least 8 for the digits demo, got {image_size}.")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be positive, got {samples_per_shard}.")
    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(seed)
    splits = dict(zip(("train", "val"), _stratified_split(labels, val_fraction, rng)))
    out = Path(out_dir)
    result: Dict[str, List[Path]] = {}
    for split, indices in splits.items():
        caption_rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        with AtomicShardWriter(out, split, samples_per_shard) as writer:
            for i, idx in enumerate(indices):
                label = int(labels[idx])
                caption = caption_for(label, caption_rng)
                writer.write({
                    "__key__": f"{split}_{i:06d}",
                    "png": _digit_png(images[idx], image_size),
                    "txt": caption,
                    "json": json.dumps({"caption": caption, "label": label, "index": int(idx)}),
                })
        result[split] = writer.paths
        _warn_stale(out, split, len(writer.paths))
        log.info("wrote %d %s digits in %d shard(s) to %s", len(indices), split, len(writer.paths), out)
    return result


# ------------------------------------------------------------------------ folder / manifest
def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _scan_folder(root: Path) -> Iterator[Tuple[Path, Optional[str], str]]:
    """(image path, caption or None, where) for every image under ``root`` with its .txt sidecar."""
    images = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
         and not _is_hidden(p, root)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for path in images:
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8-sig").strip() if sidecar.is_file() else None
        yield path, caption, path.relative_to(root).as_posix()


def _manifest_rows(manifest: Path) -> Iterator[Tuple[int, str, str]]:
    """(line number, path, caption) rows of a CSV (``path,caption`` header) or JSONL manifest."""
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
                raise DataError(f"manifest {manifest} needs a 'path,caption' header line.")
            for row in reader:
                if not row.get("path"):
                    raise DataError(f"manifest {manifest} line {reader.line_num}: empty path.")
                yield reader.line_num, row["path"], row.get("caption") or ""
    elif suffix in (".jsonl", ".ndjson"):
        with open(manifest, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"manifest {manifest} line {number} is not JSON ({err.msg}).") from None
                if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                    raise DataError(f"manifest {manifest} line {number} needs a string 'path' field.")
                caption = row.get("caption", "")
                if not isinstance(caption, str):
                    raise DataError(f"manifest {manifest} line {number}: 'caption' must be a string.")
                yield number, row["path"], caption
    else:
        raise DataError(f"manifest {manifest} must be a .csv or .jsonl file.")


def _resolve_manifest(manifest: Path, src: Optional[Path]) -> List[Tuple[Path, str, str]]:
    entries = []
    for number, raw_path, caption in _manifest_rows(manifest):
        path = Path(raw_path).expanduser()
        candidates = [path] if path.is_absolute() else [manifest.parent / path] + ([src / path] if src else [])
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DataError(
                f"manifest {manifest} line {number}: image '{raw_path}' does not exist "
                "(relative paths are read from the manifest's folder)."
            )
        entries.append((found, caption.strip(), raw_path))
    return entries


def collect_entries(src: str | Path, manifest: str | Path | None = None
                    ) -> Tuple[Sequence[Tuple[Path, Optional[str], str]], str]:
    """(image path, caption or None, name) of every image :func:`write_folder_shards` would pack,
    and the source it names in messages; :class:`DataError` when there are none."""
    src_path = Path(src).expanduser()
    if manifest is None and src_path.is_file() and src_path.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        manifest, src_path = src_path, src_path.parent
    entries: Sequence[Tuple[Path, Optional[str], str]]
    if manifest is not None:
        manifest_path = Path(manifest).expanduser()
        if not manifest_path.is_file():
            raise DataError(f"manifest '{manifest_path}' does not exist.")
        entries = _resolve_manifest(manifest_path, src_path if src_path.is_dir() else None)
        source = str(manifest_path)
    else:
        if not src_path.is_dir():
            raise DataError(f"image folder '{src_path}' does not exist; pass a folder or a manifest.")
        entries = list(_scan_folder(src_path))
        source = str(src_path)
    if not entries:
        raise DataError(f"no images found in {source} (looked for {', '.join(IMAGE_EXTS)} files).")
    return entries, source


def image_member(path: Path) -> Tuple[str, bytes]:
    """(extension, bytes) for an image file: JPEG/PNG/WebP as-is, other formats re-encoded as PNG."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        img.verify()  # raises on truncated or corrupt files
    if fmt in ("JPEG", "PNG", "WEBP"):
        return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt], data
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
    return "png", buf.getvalue()


def write_folder_shards(
    src: str | Path,
    out_dir: str | Path,
    manifest: str | Path | None = None,
    shard_size: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
) -> List[Path]:
    """Pack images with captions into ``OUT/PREFIX-NNNNNN.tar`` shards; return their paths.

    Without ``manifest``: every JPEG/PNG/WebP under the folder ``src`` (recursively, hidden
    folders skipped, sorted by path) with its ``.txt`` sidecar caption (``cat.jpg`` + ``cat.txt``).
    With ``manifest`` (or ``src`` itself a ``.csv``/``.jsonl`` file): rows of ``path,caption``
    (CSV with a header) or ``{"path": ..., "caption": ...}`` (JSONL); relative paths are read from
    the manifest's folder (then from ``src``).

    A manifest row naming a missing file raises :class:`DataError` before anything is written.
    Images that cannot be decoded, and folder images without a sidecar caption, are skipped with
    a warning and counted in the final log line. Each sample holds ``KEY.EXT`` (the original
    bytes; formats other than JPEG/PNG/WebP re-encoded as PNG), ``KEY.txt`` and ``KEY.json``
    (``{"caption", "path"}``).
    """
    if shard_size < 1:
        raise DataError(f"shard_size must be positive, got {shard_size}.")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise DataError(f"shard prefix '{prefix}' may only hold letters, digits, '_' and '-'.")
    entries, source = collect_entries(src, manifest)
    out = Path(out_dir)
    skipped: List[str] = []
    written = 0
    with AtomicShardWriter(out, prefix, shard_size) as writer:
        for path, caption, where in tqdm(entries, desc=f"packing {prefix}", unit="img", disable=not progress):
            if caption is None:
                skipped.append(where)
                log.warning("skipping %s: no caption file %s", where, path.with_suffix(".txt").name)
                continue
            try:
                ext, data = image_member(path)
            except Exception as err:
                skipped.append(where)
                log.warning("skipping %s: not a readable image (%s)", where, type(err).__name__)
                continue
            writer.write({
                "__key__": f"{written:08d}",
                ext: data,
                "txt": caption,
                "json": json.dumps({"caption": caption, "path": where}, ensure_ascii=False),
            })
            written += 1
    if written == 0:
        raise DataError(f"none of the {len(entries)} images in {source} could be packed (see warnings).")
    _warn_stale(out, prefix, len(writer.paths))
    log.info("packed %d images into %d shard(s) in %s; skipped %d%s", written, len(writer.paths), out,
             len(skipped), f" (e.g. {skipped[0]})" if skipped else "")
    return writer.paths
