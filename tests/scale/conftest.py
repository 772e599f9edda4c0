"""Fixtures and helpers for the scale-out tests: small digit shards, tiny configs, two-rank launches."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "data"))  # datakit: hand-made shards


@pytest.fixture(scope="session")
def digits16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo at 16 px in shards of 60 samples (27 train, 3 val shards)."""
    from mmdiff.data.writers import write_demo_shards

    out = tmp_path_factory.mktemp("digits16")
    write_demo_shards(out, image_size=16, samples_per_shard=60, seed=0)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> Dict[str, str]:
    """This environment without launcher/cluster variables (no SLURM or torchrun settings leak in)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                        "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def tiny_t2i_config(tmp_path: Path, shards: Path, run: str = "run", **sections: Dict[str, Any]) -> Path:
    """The demo text-to-image config at toy size (random VAE, 16 px, tiny U-Net), CSV logging.

    ``sections`` are merged one level deep into the config (``trainer={...}``, ``data={...}``).
    """
    cfg: Dict[str, Any] = {
        "base": [str(REPO / "configs/demo/text_to_image.yaml")],
        "run_dir": str(tmp_path / run),
        "model": {
            "vae": {"pretrained": None, "block_out_channels": [32, 32], "scale_estimate_batches": 1},
            "clip": {"pretrained": None},
            "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8},
            "ema_decay": 0.9,
        },
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "batch_size": 4, "val_batch_size": 8, "num_workers": 0, "steps_per_epoch": 7,
                 "image_size": 16, "shuffle_buffer": 20},
        "sampling": {"prompts": ["a handwritten digit one"], "steps": 2, "every_n_steps": 100000},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 10, "val_every_n_steps": 100000, "limit_val_batches": 1,
                    "checkpoint_every_n_steps": 100000, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "accelerator": "cpu", "devices": "1"},
        "logger": {"kind": "csv"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)  # one level deep: a section's sub-dicts are replaced
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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
