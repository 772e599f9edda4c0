"""tools/demo_stages.py (`make demo`'s stage runner): stages wait for the ones they need, at most
``parallel`` run at once, each gets its thread count, a failure stops the demo naming the log."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, List

import pytest

from tiny_configs import REPO, load_tool


@pytest.fixture(scope="module")
def tool() -> Any:
    return load_tool("demo_stages")


def _marker(out: Path, name: str, sleep: float = 0.3) -> List[str]:
    """A command that writes START and END times and its OMP_NUM_THREADS into out/name."""
    code = (
        "import os, sys, time; from pathlib import Path; p = Path(sys.argv[1]); "
        "s = time.time(); time.sleep(float(sys.argv[2])); "
        "p.write_text(f'{s} {time.time()} {os.environ[\"OMP_NUM_THREADS\"]}'); print('hello from', p.name)"
    )
    return [sys.executable, "-c", code, str(out / name), str(sleep)]


def _span(out: Path, name: str) -> tuple:
    start, end, threads = (out / name).read_text().split()
    return float(start), float(end), int(threads)


def test_stages_wait_for_their_needs_and_run_side_by_side(tool: Any, tmp_path: Path, capsys: Any) -> None:
    stages = [
        tool.Stage("a", _marker(tmp_path, "a", 1.0)),
        tool.Stage("b", _marker(tmp_path, "b", 3.0)),   # still running when a's slot frees
        tool.Stage("c", _marker(tmp_path, "c", 0.1), needs=("a", "b"), log_file=tmp_path / "c.log"),
    ]
    times = tool.run_stages(stages, parallel=2, threads=3)
    a, b, c = (_span(tmp_path, n) for n in "abc")
    assert c[0] >= max(a[1], b[1])               # c started after both of its needs ended
    assert b[0] < a[1] and a[0] < b[1]           # a and b overlapped
    assert {a[2], b[2], c[2]} == {3}
    assert set(times) == {"a", "b", "c"} and all(t.wall > 0 and t.cpu >= 0 for t in times.values())
    assert "hello from c" in (tmp_path / "c.log").read_text()
    assert "[c] hello from c" in capsys.readouterr().out


def test_parallel_caps_how_many_run_at_once(tool: Any, tmp_path: Path) -> None:
    stages = [tool.Stage(n, _marker(tmp_path, n, 0.3)) for n in "abc"]
    started = time.time()
    tool.run_stages(stages, parallel=1)
    spans = sorted(_span(tmp_path, n) for n in "abc")
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))
    assert time.time() - started >= 0.9


def test_a_failing_stage_stops_the_run_and_names_its_log(tool: Any, tmp_path: Path) -> None:
    fail = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    stages = [
        tool.Stage("slow", _marker(tmp_path, "slow", 30.0)),
        tool.Stage("bad", fail, log_file=tmp_path / "bad.log"),
        tool.Stage("after", _marker(tmp_path, "after"), needs=("bad",)),
    ]
    started = time.time()
    with pytest.raises(tool.StageFailed, match=r"'bad' failed with exit status 3; its log: .*bad\.log"):
        tool.run_stages(stages, parallel=2)
    assert time.time() - started < 20           # the slow stage was stopped, not waited for
    assert not (tmp_path / "after").exists()
    assert "boom" in (tmp_path / "bad.log").read_text()


def test_unknown_or_circular_needs_are_refused(tool: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs nope, which is not a stage"):
        tool.run_stages([tool.Stage("a", _marker(tmp_path, "a"), needs=("nope",))])
    loop = [tool.Stage("a", _marker(tmp_path, "a"), needs=("b",)), tool.Stage("b", _marker(tmp_path, "b"), needs=("a",))]
    with pytest.raises(ValueError, match="form a cycle"):
        tool.run_stages(loop)


@pytest.fixture()
def demo(monkeypatch: Any, tmp_path: Path) -> Any:
    """tools/demo.py as a module, run from an empty folder (its runs/ and data/ are relative)."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    monkeypatch.chdir(tmp_path)
    module = load_tool("demo")
    monkeypatch.setattr(module, "T2I", str(REPO / module.T2I))
    monkeypatch.setattr(module, "FITS", [(n, str(REPO / c), needs) for n, c, needs in module.FITS])
    return module


def test_demo_plan_trains_t2i_from_the_precomputed_latents(demo: Any) -> None:
    outputs, todo = demo._stages(force=False)
    stages = {s.name: s for s in todo}
    assert set(stages) == {"vae", "clip", "latents", "t2i", "caption_ar"}
    assert stages["latents"].needs == ("vae", "clip") and stages["t2i"].needs == ("latents",)
    assert stages["caption_ar"].needs == ("clip",)
    t2i = stages["t2i"].command
    assert "model.precomputed=true" in t2i and "data.train_shards=runs/demo/latents/train-*.tar" in t2i
    assert stages["latents"].command[2:5] == ["mmdiff.cli", "precompute", demo.T2I]
    assert outputs["t2i"] == Path("runs/demo/t2i/checkpoints/last.ckpt")


def test_demo_plan_skips_finished_stages_and_drops_them_from_needs(demo: Any) -> None:
    for name in ("vae", "clip"):
        ckpt = Path(f"runs/demo/{name}/checkpoints/last.ckpt")
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    _, todo = demo._stages(force=False)
    stages = {s.name: s for s in todo}
    assert set(stages) == {"latents", "t2i", "caption_ar"}
    assert stages["latents"].needs == () and stages["caption_ar"].needs == ()
    _, todo = demo._stages(force=True)
    assert len(todo) == 5 and not Path("runs/demo/vae").exists()
