"""img2dataset's output layout: reading a folder of its shards, and writing one.

img2dataset (``--output_format webdataset``) writes, per shard ``NNNNN`` (five digits):

* ``NNNNN.tar`` — ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` for each sample it could download and
  resize; failed samples are absent. The json holds ``url``, ``caption``, ``key``, ``status``,
  ``error_message``, ``width``, ``height``, ``original_width``, ``original_height``, ``exif``,
  ``sha256`` and any extra input columns (aesthetic scores, watermark probabilities, ...);
* ``NNNNN.parquet`` — the same metadata for every input row, failed ones included;
* ``NNNNN_stats.json`` — ``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``,
  ``duration``, ``start_time``, ``end_time`` and ``status_dict`` (how many rows ended how).

Training reads such a folder as it is (``data.train_shards: [FOLDER]``,
:func:`mmdiff.data.shards.expand_shards`): the tars are the shards, the stats files give a summary
line, the parquet files are not needed. :func:`write_img2dataset_shards` writes the same layout from an image folder or manifest (``mmdiff shards folder --layout
img2dataset``), with the parquet files only when pyarrow is installed.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from PIL import Image
from webdataset import TarWriter

from mmdiff.data.writers import collect_entries, image_member
from mmdiff.errors import DataError
from mmdiff.io.atomic import AtomicFile, write_text_atomic

log = logging.getLogger(__name__)

_SHARD_DIGITS = 5  # img2dataset's oom_shard_count default
_FIXED_MTIME = 946684800.0  # 2000-01-01: reproducible tar bytes
_TAR_NAME = re.compile(r"(\d+)\.tar")


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _write_parquet(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with AtomicFile(path) as f:
        pq.write_table(pa.Table.from_pylist(list(rows)), f)


def _sample_meta(key: str, caption: str, where: str, data: bytes) -> Dict[str, Any]:
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return {"url": where, "caption": caption, "key": key, "status": "success", "error_message": None,
            "width": width, "height": height, "original_width": width, "original_height": height,
            "exif": None, "sha256": hashlib.sha256(data).hexdigest()}


def _write_shard(out: Path, shard_id: int, entries: Sequence[Tuple[Path, str, str]], key_digits: int,
                 parquet: bool) -> int:
    """One ``NNNNN.tar`` (+ stats, + parquet): returns the number of samples written."""
    name = f"{shard_id:0{_SHARD_DIGITS}d}"
    start = time.time()
    rows: List[Dict[str, Any]] = []
    status: Dict[str, int] = {}
    with AtomicFile(out / f"{name}.tar", remove_leftovers=True) as f:
        writer = TarWriter(f, encoder=False, mtime=_FIXED_MTIME)
        for i, (path, caption, where) in enumerate(entries):
            key = f"{name}{i:0{key_digits}d}"
            try:
                ext, data = image_member(path)
                meta = _sample_meta(key, caption, where, data)
            except Exception as err:  # absent from the tar, as img2dataset leaves failed samples
                log.warning("skipping %s: not a readable image (%s)", where, type(err).__name__)
                meta = {"url": where, "caption": caption, "key": key, "status": "failed_to_resize",
                        "error_message": type(err).__name__, "width": None, "height": None,
                        "original_width": None, "original_height": None, "exif": None, "sha256": None}
            else:
                writer.write({"__key__": key, ext: data, "txt": caption.encode("utf-8"),
                              "json": json.dumps(meta, indent=4, ensure_ascii=False).encode("utf-8")})
            rows.append(meta)
            label = meta["status"] if meta["status"] == "success" else meta["error_message"]
            status[label] = status.get(label, 0) + 1
        writer.close()
    successes = status.get("success", 0)
    end = time.time()
    stats = {"count": len(entries), "successes": successes, "failed_to_download": 0,
             "failed_to_resize": len(entries) - successes, "duration": end - start,
             "start_time": start, "end_time": end, "status_dict": status}
    write_text_atomic(out / f"{name}_stats.json", json.dumps(stats, indent=4))
    if parquet:
        _write_parquet(out / f"{name}.parquet", rows)
    return successes


def write_img2dataset_shards(src: str | Path, out_dir: str | Path, manifest: str | Path | None = None,
                             shard_size: int = 1000) -> List[Path]:
    """Pack an image folder or manifest (as :func:`~mmdiff.data.writers.write_folder_shards` reads
    them) into img2dataset's layout in ``out_dir``; return the tar paths.

    Images keep their own bytes and extension (img2dataset re-encodes to ``.jpg``); ``width`` /
    ``height`` and ``original_width`` / ``original_height`` are the image's size. Images without a
    caption sidecar are left out with a warning; unreadable ones are counted as failed in the
    stats and the parquet, and absent from the tar.
    """
    if shard_size < 1:
        raise DataError(f"shard_size must be positive, got {shard_size}.")
    entries, source = collect_entries(src, manifest)
    usable: List[Tuple[Path, str, str]] = []
    for path, caption, where in entries:
        if caption is None:
            log.warning("skipping %s: no caption file %s", where, path.with_suffix(".txt").name)
        else:
            usable.append((path, caption, where))
    if not usable:
        raise DataError(f"none of the {len(entries)} images in {source} has a caption file.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parquet = _have_pyarrow()
    if not parquet:
        log.warning("pyarrow is not installed: no NNNNN.parquet files are written (the tars and "
                    "NNNNN_stats.json files are complete); pip install pyarrow to get them")
    key_digits = max(1, math.ceil(math.log10(shard_size)))
    paths, written = [], 0
    for shard_id in range(math.ceil(len(usable) / shard_size)):
        chunk = usable[shard_id * shard_size:(shard_id + 1) * shard_size]
        written += _write_shard(out, shard_id, chunk, key_digits, parquet)
        paths.append(out / f"{shard_id:0{_SHARD_DIGITS}d}.tar")
    stale = sorted(p.name for p in out.iterdir() if (m := _TAR_NAME.fullmatch(p.name)) and int(m.group(1)) >= len(paths))
    if stale:
        log.warning("%s holds older shards not written now (%s...); delete them or a folder spec reads them",
                    out, stale[0])
    if written == 0:
        raise DataError(f"none of the {len(usable)} images in {source} could be packed (see warnings).")
    log.info("packed %d of %d images into %d img2dataset shard(s) in %s", written, len(usable), len(paths),
             os.fspath(out))
    return paths
