"""Fixtures of the interop tests; the helpers live in interopkit.py (imported by name)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interopkit import tiny_system, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tiny_system(), tmp_path_factory.mktemp("tiny") / "tiny.ckpt")
