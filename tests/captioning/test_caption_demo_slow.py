"""The demo pipeline at reduced length: contrastive CLIP → both captioners name the digits (slow)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmdiff.cli import main

REPO = Path(__file__).resolve().parents[2]


def _fit(tmp: Path, shards: Path, name: str, steps: int, **model) -> Path:
    cfg = {
        "base": [str(REPO / "configs/demo" / f"{name}.yaml")],
        "run_dir": str(tmp / name),
        "model": model,
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "num_workers": 0},
        "trainer": {"max_steps": steps, "val_every_n_steps": steps, "checkpoint_every_n_steps": steps,
                    "enable_progress_bar": False},
        "logger": {"kind": "none"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path)]) == 0
    return tmp / name / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three fits of 500-1000 steps: ~4 min alone, > 10 min beside other jobs
def test_demo_captioners_name_the_digit(tmp_path: Path, demo_shards: Path) -> None:
    from mmdiff.inference.api import load
    from mmdiff.inference.caption_files import evaluate_captioner

    clip = _fit(tmp_path, demo_shards, "clip", 500)
    ar = _fit(tmp_path, demo_shards, "caption_ar", 500, clip={"pretrained": str(clip)})
    masked = _fit(tmp_path, demo_shards, "caption_diffusion", 1000, clip={"pretrained": str(clip)})
    val = str(demo_shards / "val-*.tar")
    ar_metrics = evaluate_captioner(load(ar, expect="captioning", device="cpu"), val)
    assert ar_metrics["n"] == 179
    assert ar_metrics["digit_accuracy"] >= 0.9, ar_metrics
    assert ar_metrics["bleu4"] > 0.1
    system = load(masked, expect="captioning", device="cpu")
    at = {k: evaluate_captioner(system, val, steps=k)["digit_accuracy"] for k in (1, 16)}
    assert at[16] >= 0.85 and at[16] >= at[1], at
