"""`mmdiff bench` end to end at tiny size: a smoke test of its sections and JSON (never timed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.errors import ConfigError


def test_bench_runs_every_section_and_writes_json(tiny_cfg_path: Path, precomputed: Path,
                                                  tmp_path: Path) -> None:
    from mmdiff.jobs.bench import format_table, run_bench, write_json

    cfg = load_config(tiny_cfg_path)
    result = run_bench(cfg, steps=2, warmup=1, rounds=1, loader_batches=2, sample_batch_sizes=(1, 2),
                       sample_steps=2, threads=1, precomputed_dir=str(precomputed))
    path = write_json(result, tmp_path / "bench.json")
    data = json.loads(path.read_text())
    assert {"environment", "config", "train", "fit", "loader", "flops", "sampling", "memory", "targets",
            "load_average_start", "load_average_end"} <= set(data)
    assert data["environment"]["threads"] == 1
    assert set(data["config"]["attention_processors"]) == {"AttnProcessor2_0"}
    for mode in ("online", "precomputed"):
        row = data["train"][mode]
        assert row["framework"]["steps"] == 2 and row["plain"]["steps"] == 2
        assert row["framework"]["step_s"] > 0 and row["overhead"] > 0
    assert data["train"]["precomputed_speedup"] > 0
    for mode in ("online", "precomputed"):  # interleaved: one pair of 2 + 2 steps, a verdict on it
        row = data["train"][mode]
        assert row["ratio"]["n"] == 1 and row["overhead"] == pytest.approx(row["ratio"]["median"])
        assert row["verdict"]["noisy"] and "too noisy to judge" in row["verdict"]["text"]
        assert row["framework"]["spread"]["n"] == 2
    assert len(data["train"]["precomputed_speedup_by_round"]) == 1
    assert data["fit"]["online"]["steps"] == 2 and data["fit"]["precomputed"]["steps"] == 2
    assert data["fit"]["precomputed_speedup"] > 0
    assert set(data["loader"]["by_workers"]) == {"0"}
    assert data["loader"]["headroom_online"] > 0
    f = data["flops"]
    assert f["unet_train_per_image"] > 2 * f["unet_forward_per_image"] > 0
    assert f["vae_encode_per_image"] > 0 and f["text_encode_per_image"] > 0
    assert f["mfu"] is None and f["achieved_tflops"]["online"] > 0  # no GPU peak on a CPU
    rows = data["sampling"]["by_batch"]
    assert set(rows) == {"1", "2"} and rows["2"]["unet_calls"] == 2
    assert data["sampling"]["sampler"] == "dpmpp_2m"
    assert data["memory"]["cpu_peak_rss_mb"] > 0
    assert {"overhead_online<=1.10", "overhead_precomputed<=1.10", "precomputed_speedup>=1.3",
            "loader_headroom>=3", "fit_precomputed_speedup>=1.3",
            "precomputed_speedup_cpu_time>=1.3"} <= set(data["targets"])
    assert data["train"]["online"]["framework"]["step_cpu_s"] > 0
    table = format_table(result)
    assert "(a) framework" in table and "too noisy to judge" in table and "s/image" in table and "load average" in table


def test_bench_cli_one_section(tiny_cfg_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "flops.json"
    assert main(["bench", str(tiny_cfg_path), "--only", "flops", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "train" not in data and math.isfinite(data["flops"]["unet_train_per_image"])
    assert "FLOPs per image" in capsys.readouterr().out
    assert main(["bench", str(tiny_cfg_path), "--only", "speed"]) == 2
    assert "unknown bench section" in capsys.readouterr().err
    assert main(["bench", str(tiny_cfg_path), "--preset", "nope"]) == 2


def test_presets_are_valid_overrides() -> None:
    from mmdiff.jobs.bench import PRESETS

    repo = Path(__file__).resolve().parents[2]
    sd = repo / "configs/sd/sd_256.yaml"
    if not sd.is_file():
        pytest.skip("no real-scale config in this checkout")
    cfg = load_config(sd, PRESETS["random-weights-sd"])
    assert cfg.model.vae.pretrained is None and cfg.model.clip.pretrained is None


def test_bench_refuses_other_systems() -> None:
    from mmdiff.jobs.bench import run_bench

    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match="text_to_image"):
        run_bench(load_config(repo / "configs/demo/vae.yaml"))
