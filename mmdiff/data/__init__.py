"""mmdiff.data: webdataset shards → batches, and the shard writers.

Public API (imported lazily so that ``mmdiff.data.digits`` stays light):

* :class:`~mmdiff.data.datamodule.ShardDataModule` — the LightningDataModule.
* :func:`~mmdiff.data.writers.write_demo_shards`, :func:`~mmdiff.data.writers.write_folder_shards`,
  :func:`~mmdiff.data.img2dataset.write_img2dataset_shards` (img2dataset's layout).
* :func:`~mmdiff.data.shards.expand_shards` — shard specs → URLs.
* :func:`~mmdiff.data.skips.count_skipped` — skipped samples in one pass of a dataloader.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardDataModule": "mmdiff.data.datamodule",
    "write_demo_shards": "mmdiff.data.writers",
    "write_folder_shards": "mmdiff.data.writers",
    "write_img2dataset_shards": "mmdiff.data.img2dataset",
    "expand_shards": "mmdiff.data.shards",
    "count_skipped": "mmdiff.data.skips",
    "SkipTally": "mmdiff.data.skips",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmdiff.data' has no attribute {name!r}")
