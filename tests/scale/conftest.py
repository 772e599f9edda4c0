"""Fixtures and helpers for the scale-out tests: small digit shards, tiny configs, two-rank launches."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "data"))  # datakit: hand-made shards
sys.path.insert(0, str(HERE.parent))  # tiny_configs: the toy-size configs all test folders share
from multiproc import free_port  # noqa: E402,F401  (the scale tests import it from here)


@pytest.fixture(scope="session")
def digits16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo at 16 px in shards of 60 samples (27 train, 3 val shards)."""
    from mmdiff.data.writers import write_demo_shards

    out = tmp_path_factory.mktemp("digits16")
    write_demo_shards(out, image_size=16, samples_per_shard=60, seed=0)
    return out


def clean_env(**extra: str) -> Dict[str, str]:
    """This environment without launcher/cluster variables (no SLURM or torchrun settings leak in)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                        "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def csv_metrics(run_dir: Path, key: str = "train/loss") -> Dict[int, float]:
    """{step: value} of one metric over all CSVLogger versions of a run (later versions win)."""
    import csv

    out: Dict[int, float] = {}
    for version in sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])] = float(row[key])
    return out


def csv_steps(run_dir: Path, key: str = "train/loss") -> List[List[int]]:
    """The logged steps of one metric, per CSVLogger version (one list per start of the run)."""
    import csv

    runs = []
    for version in sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            runs.append([int(r["step"]) for r in csv.DictReader(f) if r.get(key)])
    return runs
