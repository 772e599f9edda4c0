"""Shared fixtures: offline W&B, few threads (one per xdist worker), demo digit shards written once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One of several test processes (`make test` runs pytest-xdist workers, one per core): one
    # intra-op thread each, and for the processes its tests start, so the workers don't
    # oversubscribe the cores and starve each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo shards at 32×32 (train-*.tar, val-*.tar)."""
    from mmdiff.data.writers import write_demo_shards

    out = tmp_path_factory.mktemp("digits")
    write_demo_shards(out, image_size=32, seed=0)
    return out


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test (tiny models run faster so on a busy machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
