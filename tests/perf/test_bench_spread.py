"""The interleaving order and the statistics of `mmdiff bench` on synthetic timings (never timed)."""
from __future__ import annotations

import math
import random

import pytest

from mmdiff.jobs.bench.spread import grouped_ratios, half_width, judge, quartiles, samples_needed, summary
from mmdiff.jobs.bench.steps import interleave_order


def test_interleave_order_alternates_which_side_goes_first() -> None:
    order = interleave_order(pairs=3, block=2)
    assert "".join(side for side, _ in order) == "aabb" + "bbaa" + "aabb"
    assert [p for _, p in order] == [0] * 4 + [1] * 4 + [2] * 4
    for side in "ab":  # each side gets block steps in every pair
        assert [p for s, p in order if s == side] == [0, 0, 1, 1, 2, 2]
    assert "".join(s for s, _ in interleave_order(4, 1)) == "abbaabba"


def test_summary_median_quartiles_iqr() -> None:
    s = summary([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["q1"], s["median"], s["q3"], s["iqr"], s["n"]) == (2.0, 3.0, 4.0, 2.0, 5)
    assert s["iqr_rel"] == pytest.approx(2 / 3)
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)
    assert all(math.isnan(x) for x in quartiles([]))


def test_grouped_ratios_pair_medians() -> None:
    a, ag = [2.0, 4.0, 9.0, 30.0], [0, 0, 1, 1]
    b, bg = [1.0, 1.0, 3.0, 3.0], [0, 0, 1, 1]
    assert grouped_ratios(a, ag, b, bg) == pytest.approx([3.0, 6.5])
    assert grouped_ratios([1.0], [5], [1.0], [6]) == []  # groups only one side has are left out


def test_machine_drift_cancels_in_paired_ratios() -> None:
    """Both sides slow down together (a neighbour's job): the per-side spread is wide, the paired ratio is not."""
    rng = random.Random(0)
    slow = [1.0 + 0.8 * (i % 7 == 3) + 0.3 * rng.random() for i in range(40)]  # shared machine state
    a = [1.05 * s * (1 + 0.005 * rng.random()) for s in slow]
    b = [s * (1 + 0.005 * rng.random()) for s in slow]
    ratios = grouped_ratios(a, list(range(40)), b, list(range(40)))
    assert summary(a)["iqr_rel"] > 0.1
    assert summary(ratios)["median"] == pytest.approx(1.05, abs=0.01)
    assert half_width(ratios) < 0.01
    v = judge(ratios, per_round=20, rounds=2, load=0.5, cpus=2)
    assert not v["noisy"] and v["more_rounds"] == 0 and v["text"].startswith("judged")


def test_noisy_ratios_are_refused_with_a_rounds_estimate() -> None:
    rng = random.Random(1)
    ratios = [1.0 + 0.4 * (rng.random() - 0.5) for _ in range(10)]  # ±20 % pair to pair, 10 pairs
    need = samples_needed(ratios)
    hw = half_width(ratios)
    assert hw > 0.05 and need > 10
    # n grows as (half-width / 5 %)², from the 10 pairs measured
    assert need == pytest.approx(10 * (hw / 0.05) ** 2, rel=0.05, abs=1)
    v = judge(ratios, per_round=5, rounds=2, load=0.1, cpus=2)
    assert v["noisy"] and "too noisy to judge" in v["text"]
    assert v["more_rounds"] == math.ceil(need / 5) - 2
    assert f"{v['more_rounds']} more round" in v["text"]


def test_load_above_cpus_is_too_noisy_even_when_tight() -> None:
    ratios = [1.0, 1.001, 0.999, 1.0, 1.0005, 0.9995]
    v = judge(ratios, per_round=3, rounds=2, load=5.3, cpus=2)
    assert v["noisy"] and "load 5.30 > 2 CPUs" in v["text"] and v["more_rounds"] == 0
    assert "the ratio alone: ±0.1 %" in v["text"]
    assert not judge(ratios, per_round=3, rounds=2, load=1.9, cpus=2)["noisy"]


def test_a_bench_busy_on_every_core_is_not_its_own_noise() -> None:
    """The 2-rank DDP bench on 2 CPUs reads a load of ~2.1 on a quiet machine: judged; half a
    runnable process more than that is another job's."""
    ratios = [1.0, 1.001, 0.999, 1.0, 1.0005, 0.9995]
    assert not judge(ratios, per_round=3, rounds=2, load=2.12, cpus=2)["noisy"]
    assert judge(ratios, per_round=3, rounds=2, load=2.6, cpus=2)["noisy"]


def test_one_pair_cannot_be_judged() -> None:
    v = judge([1.02], per_round=1, rounds=1)
    assert v["noisy"] and v["pairs_needed"] is None and "fewer than two pairs" in v["text"]


def test_a_real_fit_runs_the_plain_loop_in_the_interleaving_order(tiny_cfg_path) -> None:
    """(b)'s steps really run between (a)'s inside one fit, in interleave_order, warm-up untimed."""
    import torch

    from mmdiff.config import load_config
    from mmdiff.jobs.bench import interleaved_steps, make_batch
    from mmdiff.systems.text_to_image import TextToImageSystem

    cfg = load_config(tiny_cfg_path)
    system = TextToImageSystem(cfg)
    system.latent_scale.fill_(1.0)
    system.speed = {}
    system.precomputed = False
    got = interleaved_steps(system, cfg, make_batch(cfg, int(cfg.data.batch_size)), pairs=3, block=1,
                            warmup=1, device=torch.device("cpu"), precomputed=False)
    assert got["order"] == interleave_order(3, 1)
    assert got["a"]["pair"] == [0, 1, 2] and got["b"]["pair"] == [0, 1, 2]
    assert all(x > 0 for side in "ab" for x in got[side]["wall"])
