"""Long-run health: the resource probe sees memory and descriptors, and a short run stays flat."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmdiff.callbacks.resources import FIELDS, descendants, sample, summarize

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]


def test_sample_sees_children_and_open_files(tmp_path: Path) -> None:
    before = sample(0)
    assert set(before) == set(FIELDS) and before["rss_main_mb"] > 10
    # The child says when its 50 MB are touched, so a loaded machine only makes this slower.
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; x = bytearray(50 << 20); "
                              "print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    files = [open(tmp_path / f"f{i}", "w") for i in range(5)]
    try:
        assert child.stdout.readline().strip() == "ready"
        now = sample(1)
        assert child.pid in descendants(os.getpid())
        assert now["children"] >= before["children"] + 1
        assert now["rss_children_mb"] >= before["rss_children_mb"] + 40
        assert now["open_fds"] >= before["open_fds"] + 5
    finally:
        for f in files:
            f.close()
        child.kill()
        child.wait()


def test_summarize_reports_growth_after_warmup() -> None:
    rows = [
        {"step": s, "rss_main_mb": m, "rss_children_mb": 0.0, "rss_total_mb": m, "children": 0.0,
         "open_fds": fd}
        for s, m, fd in [(0, 50.0, 10), (100, 100.0, 20), (200, 104.0, 24), (300, 103.0, 20),
                         (400, 103.0, 24), (500, 103.0, 20), (600, 103.0, 27)]
    ]
    summary = summarize(rows, warmup_step=100)
    assert summary["rss_total_growth_pct"] == 4.0 and summary["rss_main_mb_end"] == 103.0
    assert summary["fds_max_increase"] == 7 and summary["open_fds_end"] == 27
    assert summary["fds_trend"] == 3  # max of the last third (27) - max of the first third (24)
    assert summarize(rows[:-1], warmup_step=100)["fds_trend"] == 0  # 20 <-> 24 toggling: no trend
    with pytest.raises(ValueError):
        summarize(rows, warmup_step=1000)


@pytest.mark.slow
def test_short_longrun_keeps_memory_and_fds_flat(tmp_path: Path) -> None:
    """300 steps of tools/longrun_probe.py (val, checkpoints, previews every 50): after 100 steps of
    warm-up, RSS (main + workers) grows < 5% and open file descriptors show no upward trend."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(REPO / "tools" / "longrun_probe.py"), "--out", str(tmp_path),
           "--steps", "300", "--warmup", "100", "trainer.val_every_n_steps=50",
           "trainer.checkpoint_every_n_steps=50", "sampling.every_n_steps=50",
           "trainer.probe_resources_every_n_steps=10"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert result.returncode == 0, summary
    assert summary["rss_total_growth_pct"] < 5.0 and summary["rss_main_growth_pct"] < 5.0
    assert summary["fds_trend"] <= 0 and summary["end_step"] == 300
