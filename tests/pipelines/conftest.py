"""Tiny SD 1.x / 2.x / XL pipeline folders, saved once per session."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_pipelines import FAMILIES, save_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def pipeline_folders(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """``{"sd1": folder, "sd2": folder, "sdxl": folder}``."""
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_pipeline(family, root / family) for family in FAMILIES}
