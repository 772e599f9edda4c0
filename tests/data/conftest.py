"""Fixtures for the data tests (helpers live in datakit.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, List[Path]]:
    """Digits demo shards at 16 px with 100 samples per shard (fast to read)."""
    from mmdiff.data.writers import write_demo_shards

    return write_demo_shards(tmp_path_factory.mktemp("digits16"), image_size=16, samples_per_shard=100)
