"""The diffusion tests run many tiny tensor ops: one intra-op thread is much faster for them."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
