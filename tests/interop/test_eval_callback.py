"""The in-training evaluation callback logs eval/fid_<extractor> and eval/clipscore every K steps."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from mmdiff.callbacks.periodic_eval import ImageEvalCallback
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.errors import ConfigError

from interopkit import REPO, tiny_system


def test_callback_scores_fresh_samples_with_named_extractor(demo_shards: Path) -> None:
    system = tiny_system(**{"steps": 2})
    cfg = system.cfg.eval
    cfg.n_images, cfg.steps, cfg.metrics = 4, 2, ["fid", "kid", "clipscore"]
    callback = ImageEvalCallback(cfg, [str(demo_shards / "val-*.tar")], 16, "custom")
    result = callback.evaluate(system)
    name = result["extractor"]
    assert name.startswith("clip_custom_") and result["n_reference"] == 4
    assert result[f"fid_{name}"] > 0 and f"kid_{name}" in result and 0 <= result["clipscore"] <= 100
    assert not system.training


@pytest.mark.slow
def test_fit_logs_fid_and_clipscore_every_k_steps(tmp_path: Path, demo_shards: Path) -> None:
    cfg = {
        "base": [str(REPO / "configs/demo/text_to_image.yaml")],
        "run_dir": str(tmp_path / "run"),
        "model": {"vae": {"pretrained": None, "block_out_channels": [32, 32], "scale_estimate_batches": 1},
                  "clip": {"pretrained": None}, "unet": {"block_out_channels": [32, 32], "attention_head_dim": 8}},
        "data": {"train_shards": str(demo_shards / "train-*.tar"), "val_shards": str(demo_shards / "val-*.tar"),
                 "batch_size": 4, "num_workers": 0, "steps_per_epoch": 4, "image_size": 16},
        "sampling": {"prompts": ["a handwritten digit one"], "steps": 1, "every_n_steps": 100},
        "eval": {"every_n_steps": 2, "n_images": 6, "steps": 2, "batch_size": 6},
        "logger": {"kind": "csv"},
        "trainer": {"max_steps": 4, "val_every_n_steps": 100, "limit_val_batches": 1, "checkpoint_every_n_steps": 100,
                    "log_every_n_steps": 1, "enable_progress_bar": False},
    }
    path = tmp_path / "t2i.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path)]) == 0
    (metrics,) = (tmp_path / "run" / "csv").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    fid_key = next(k for k in rows[0] if k.startswith("eval/fid_clip_custom_"))
    logged = [(r["step"], float(r[fid_key]), float(r["eval/clipscore"])) for r in rows if r.get(fid_key)]
    assert [s for s, _, _ in logged] == ["2", "4"]
    assert all(fid > 0 and 0 <= score <= 100 for _, fid, score in logged)


def test_eval_is_off_by_default_and_checked() -> None:
    assert load_config(REPO / "configs/demo/text_to_image.yaml").eval.every_n_steps == 0
    with pytest.raises(ConfigError, match="eval.metrics"):
        load_config(REPO / "configs/demo/text_to_image.yaml", ["eval.metrics=[fid,isc]"])
