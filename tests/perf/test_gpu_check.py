"""`tools/gpu_check.sh`: refuses a CPU without --dry-run, records every section (figures, a skip
reason or an error) and runs end to end at toy size on the CPU (slow), so it cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdiff.jobs import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_cpu_without_dry_run_exits_2_with_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([str(tmp_path / "out.json")]) == 2
    assert capsys.readouterr().err == f"gpu_check: {gpu_check.NO_GPU}\n"
    assert not (tmp_path / "out.json").exists()


def test_shell_entry_refuses_a_cpu_machine(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run(["bash", str(REPO / "tools/gpu_check.sh"), str(tmp_path / "o.json")],
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"gpu_check: {gpu_check.NO_GPU}"]


def test_unknown_section_is_one_line(capsys) -> None:
    assert gpu_check.main(["--dry-run", "--only", "demo,nope"]) == 2
    assert "unknown section(s) ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("edge, start, limit", [(300, 32, 4096), (5, 32, 4096), (4096, 32, 4096),
                                                (1, 8, 64), (100, 1, 64)])
def test_largest_batch_finds_the_edge_of_memory(edge: int, start: int, limit: int) -> None:
    tried = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= edge

    got = gpu_check.largest_batch(fits, start=start, limit=limit)
    best = min(edge, limit)
    assert got <= best and got >= best - max(1, best // 16)
    assert len(tried) <= 20


def test_largest_batch_is_zero_when_nothing_fits() -> None:
    assert gpu_check.largest_batch(lambda b: False, start=32, limit=4096) == 0


def test_oom_is_recognised() -> None:
    assert gpu_check.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not gpu_check.is_oom(ValueError("shapes do not match"))


def test_each_section_is_recorded_even_when_one_times_out(monkeypatch, tmp_path: Path) -> None:
    """A section past its budget is that section's error; the others still run and the JSON is
    written; sections past the script's deadline are recorded as not run."""
    monkeypatch.setitem(gpu_check.SECTIONS, "resume", 0.5)
    out = tmp_path / "gpu.json"
    result = gpu_check.run_all(out, dry_run=True, sections=["resume", "fp16_scaler"], deadline_s=600)
    data = json.loads(out.read_text())
    assert data["sections"] == json.loads(json.dumps(result["sections"]))
    resume, fp16 = data["sections"]["resume"], data["sections"]["fp16_scaler"]
    assert resume["status"] == "error" and resume["error"].startswith("timed out after")
    assert fp16["status"] == "skipped" and "needs a GPU" in fp16["reason"]
    assert data["table"][0].startswith("mmdiff GPU check")

    late = gpu_check.run_all(tmp_path / "late.json", dry_run=True, sections=["fp16_scaler"], deadline_s=0)
    assert late["sections"]["fp16_scaler"] == {"status": "error",
                                              "error": "not run: the script's deadline passed"}


def test_sigterm_records_the_stop_and_leaves_no_section_running(tmp_path: Path) -> None:
    import os
    import signal
    import time

    out, marker = tmp_path / "gpu.json", f"GPU_CHECK_TEST_{os.getpid()}_{id(tmp_path)}"
    proc = subprocess.Popen(["bash", str(REPO / "tools/gpu_check.sh"), str(out), "--dry-run", "--only",
                             "resume,fp16_scaler"], env={**os.environ, "PYTHON": sys.executable, marker: "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while not out.exists() and proc.poll() is None:  # written once the SIGTERM handler is in place
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    sections = json.loads(out.read_text())["sections"]
    for name in ("resume", "fp16_scaler"):
        assert sections[name]["status"] == "error" and "interrupted (SystemExit)" in sections[name]["error"]
    left = [pid for pid in _pids_with_env(marker) if pid != os.getpid()]
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def _pids_with_env(name: str) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"{name}=".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_raising_section_is_an_error_entry(monkeypatch) -> None:
    def boom(dry_run, params):
        raise RuntimeError("NCCL error: unhandled system error\nmore detail")

    monkeypatch.setitem(gpu_check.RUNNERS, "fsdp", boom)
    entry = gpu_check.run_section("fsdp", True, {})
    assert entry["status"] == "error" and entry["error"] == "RuntimeError: NCCL error: unhandled system error"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_end_to_end_records_every_section(tmp_path: Path) -> None:
    """Every section at toy size on the CPU: figures or an explicit skip reason, never an error."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "tools/gpu_check.sh"), str(out), "--dry-run"],
                          env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1700)
    data = json.loads(out.read_text())
    sections = data["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    errors = {k: v for k, v in sections.items() if v["status"] not in ("ok", "skipped")}
    assert not errors, errors
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("fp16_scaler", "sd_unet_regional"):  # 16-mixed needs a GPU; compiling takes minutes on a CPU
        assert sections[name]["status"] == "skipped" and sections[name]["reason"]
    for prec in ("32-true", "bf16-mixed"):
        assert sections["demo"][prec]["online_framework_steps_per_s"] > 0
        assert sections["demo"][prec]["overhead_online"] > 0
    s = sections["sd_unet_eager"]
    assert s["batch"] >= 1 and s["images_per_s"] > 0 and s["unet_train_flops_per_image"] > 0
    assert s["speed_switches"]["channels_last"] is True and s["precision"] == "bf16-mixed"
    assert set(sections["sampling"]["by_batch"]) == {"1", "2"}
    assert sections["fsdp"]["finite"] and sections["fsdp"]["backend"] == "gloo"
    assert sections["fp16_vae"]["fp16_encode_overflows"] and sections["fp16_vae"]["latents_finite"]
    assert sections["resume"]["max_abs_loss_diff_steps_11_20"] <= 1e-6
    assert "sd_unet_eager" in proc.stdout


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items()}


# ------------------------------------------------------- CUDA code paths checked on the CPU
def test_fsdp2_shards_a_channels_last_unet(tmp_path: Path) -> None:
    """channels_last is on by default on CUDA and the system applies it (configure_model) before
    the strategy shards; fully_shard refused such weights ("non-contiguous parameters")."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from mmdiff.callbacks.sharding import has_sharded_parameters
    from mmdiff.run.strategies import shard_trainable

    class System(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = nn.Module()
            self.unet.blocks = nn.ModuleList([nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)])
            self.vae = nn.Conv2d(3, 4, 1).requires_grad_(False)

    torch.manual_seed(0)
    system = System()
    system.unet.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    expected = system.unet.blocks[1](system.unet.blocks[0](x))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
        assert shard_trainable(system, mesh) == ["unet"]
        assert has_sharded_parameters(system.unet) and not has_sharded_parameters(system.vae)
        got = system.unet.blocks[1](system.unet.blocks[0](x))
        got.sum().backward()
    finally:
        dist.destroy_process_group()
    assert torch.allclose(got, expected, atol=1e-6)
