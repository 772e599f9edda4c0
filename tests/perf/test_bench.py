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
            "loader_headroom>=3", "loader_buckets>=0.8", "fit_precomputed_speedup>=1.3",
            "precomputed_speedup_cpu_time>=1.3"} <= set(data["targets"])
    assert data["train"]["online"]["framework"]["step_cpu_s"] > 0
    table = format_table(result)
    assert "(a) framework" in table and "too noisy to judge" in table and "s/image" in table and "load average" in table


def test_loader_reads_the_shards_square_and_with_buckets_side_by_side(tiny_cfg_path: Path) -> None:
    import statistics

    from mmdiff.jobs.bench import bench_loader, format_table, targets
    from mmdiff.jobs.bench.spread import grouped_ratios

    cfg = load_config(tiny_cfg_path)
    loader = bench_loader(cfg, batches=4, warmup=1, bucket_step=4, block=2)
    b = loader["buckets"]
    square, bucketed = b["square"], b["buckets"]
    assert square["batches"] == bucketed["batches"] == 4 and b["ratio"]["n"] == 2
    assert bucketed["sizes"] == [[12, 20], [16, 16], [20, 12]]  # 16² pixels in multiples of 4
    assert bucketed["batches_by_shape"] == {"16x16": 4}  # the digits are square
    assert square["pair"] == bucketed["pair"] == [0, 0, 1, 1]  # a a b b · b b a a: two pairs
    pair_ratios = grouped_ratios(square["batch_times_s"], square["pair"], bucketed["batch_times_s"], bucketed["pair"])
    assert b["throughput_ratio"] == statistics.median(pair_ratios)  # square / bucketed time, pair by pair
    for ratio, met in ((0.79, False), (0.8, True), (1.2, True)):
        result = {"loader": {**loader, "buckets": {**b, "throughput_ratio": ratio}}}
        assert targets(result) == {"loader_buckets>=0.8": met}
    table = format_table({"environment": {"device": "cpu", "torch": "x", "threads": 1},
                          "config": {"name": "t", "batch_size": 8, "image_size": 16, "precision": "32"},
                          "loader": loader})
    assert f"buckets/square {b['throughput_ratio']:.3f}" in table and "12x20, 16x16, 20x12" in table


def test_loader_with_buckets_uses_the_configs_set_and_reports_a_bad_step(tiny_cfg_path: Path) -> None:
    from mmdiff.jobs.bench import bench_loader, bucket_data, square_data, targets

    cfg = load_config(tiny_cfg_path, ["data.buckets.enabled=true", "data.buckets.sizes=[16x16,24x16]",
                                      "data.buckets.step=8"])
    assert bucket_data(cfg.data, 4) is cfg.data  # the config's own set, not one made for the bench
    off = square_data(cfg.data)
    assert not off.buckets.enabled and list(off.buckets.sizes) == []
    loader = bench_loader(load_config(tiny_cfg_path), batches=2, warmup=1, bucket_step=64)  # no 64-multiple fits 16²
    assert "no bucket" in loader["buckets"]["error"] and loader["by_workers"]["0"]["images_per_s"] > 0
    assert targets({"loader": loader}) == {}


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
