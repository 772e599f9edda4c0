"""Exact resume: a run interrupted after its step-20 checkpoint (SIGTERM, or SIGKILL) and resumed
with ``--resume last`` ends with the same U-Net weights as an uninterrupted 40-step run, and logs
the same losses for steps 21-40.

What makes it exact (docs/scale_out.md): the training batches are a deterministic function of
(seed, rank, worker, sample index) and every rank's data position is checkpointed
(DataPositionCallback); torch's RNG — caption dropout, VAE posterior sample, timesteps, noise — is
reseeded per batch from (seed, rank, batch index) (StepSeedCallback), since Lightning does not
checkpoint RNG states. The config resumes mid-epoch (20 = 13 + 7) on worker 1's turn of 2.
The DDP variant (2 CPU ranks, gloo, Lightning's own launcher) checks that every rank gets its own
position back: the checkpoint holds both ranks' (gathered at save time).
The default run keeps one fast case (SIGKILL after step 3 of 6, 4 steps per epoch, resumed);
the 40-step runs and the fast case on mixed-aspect shards with aspect-ratio buckets (samples wait
in their bucket's buffer across the checkpoint) are marked slow. The interrupted run holds still after its checkpoint until it
is signalled (interrupt_worker.py), so no case depends on the run's speed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest
import torch

from conftest import HERE, clean_env, csv_metrics
from datakit import mixed_aspect_shards
from tiny_configs import tiny_t2i_config

SETUPS = {  # name: (DataLoader workers, trainer overrides)
    "single": (2, {}),
    "ddp": (1, {"devices": "2", "strategy": "ddp"}),
    "buckets": (2, {}),  # mixed-aspect shards in aspect-ratio buckets
}
BUCKETS = {"enabled": True, "step": 8, "sizes": ["16x16", "16x24", "24x16"]}
# name: (max steps, interrupted after, steps per epoch, validate every n steps)
SIZES = {"full": (40, 20, 13, 10), "fast": (6, 3, 4, 100000)}


def _config(tmp_path: Path, shards: Path, run: str, setup: str = "single", size: str = "full") -> Path:
    workers, trainer = SETUPS[setup]
    max_steps, kill_after, per_epoch, val_every = SIZES[size]
    data = {"num_workers": workers, "steps_per_epoch": per_epoch, "shuffle_buffer": 30, "crop": "random",
            "random_flip": True}
    if setup == "buckets":
        mixed = sorted(str(p) for p in shards.glob("mixed-*.tar"))
        data.update(train_shards=mixed, val_shards=mixed[:1], buckets=BUCKETS)
    return tiny_t2i_config(
        tmp_path, shards, run,
        data=data,
        model={"caption_dropout": 0.2, "vae": {"pretrained": None, "block_out_channels": [32, 32],
                                               "scale_estimate_batches": 1}},
        trainer={"max_steps": max_steps, "checkpoint_every_n_steps": kill_after, "val_every_n_steps": val_every,
                 **trainer},
    )


def _fit(config: Path, *extra: str, size: str = "full", timeout: float = 300) -> None:
    """``mmdiff fit``: in a process of its own, or, for the fast case, in this one with the thread
    count the interrupted process had (same kernels, so the same float results), saving two
    process start-ups."""
    if size == "fast":
        from mmdiff.cli import main

        threads = torch.get_num_threads()
        torch.set_num_threads(int(clean_env()["OMP_NUM_THREADS"]))
        try:
            assert main(["fit", str(config), *extra]) == 0
        finally:
            torch.set_num_threads(threads)
        return
    out = subprocess.run([sys.executable, "-m", "mmdiff.cli", "fit", str(config), *extra], env=clean_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


def _load(path: Path) -> Dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _unet(ckpt: Dict) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}


_STRAIGHT: Dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def mixed16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 images of many aspect ratios and sizes in 3 shards (portrait, landscape, square, tiny)."""
    out = tmp_path_factory.mktemp("mixed16")
    mixed_aspect_shards(out, 90, shards=3)
    return out


def _straight(setup: str, size: str, tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """The uninterrupted run of ``setup`` at ``size`` (made once per session)."""
    if (setup, size) not in _STRAIGHT:
        tmp = tmp_path_factory.mktemp(f"straight-{setup}-{size}")
        _fit(_config(tmp, shards, "run", setup, size), size=size)
        _STRAIGHT[setup, size] = tmp / "run"
    return _STRAIGHT[setup, size]


def _interrupt(config: Path, run_dir: Path, sig: signal.Signals, kill_after: int, ranks: int) -> None:
    """Start the run, wait until every rank holds still after its step-``kill_after`` checkpoint,
    then send ``sig``."""
    marker = run_dir.parent / "held"
    proc = subprocess.Popen([sys.executable, str(HERE / "interrupt_worker.py"), str(kill_after), str(marker),
                             str(config)], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    try:
        while not all(Path(f"{marker}.{rank}").exists() for rank in range(ranks)):
            assert proc.poll() is None, f"the run ended before it was interrupted:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no rank reached step {kill_after} after 300 s (a hang?)"
            time.sleep(0.1)
        # the whole process group: under DDP, Lightning's launcher started rank 1 as a child
        os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # SIGKILL: -9. SIGTERM: Lightning stops after the current batch; mmdiff exits 128 + 15.
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM
    assert proc.returncode == expected, output[-3000:]
    assert _load(last)["global_step"] == kill_after, "the run trained on to its next checkpoint"


@pytest.mark.xdist_group("multirank")  # make test: one xdist worker runs these one after another
@pytest.mark.timeout(900)
@pytest.mark.parametrize("setup, sig, size", [
    pytest.param("single", signal.SIGKILL, "fast", id="fast-sigkill"),
    pytest.param("buckets", signal.SIGKILL, "fast", id="fast-sigkill-buckets", marks=pytest.mark.slow),
    pytest.param("single", signal.SIGTERM, "full", id="sigterm", marks=pytest.mark.slow),
    pytest.param("single", signal.SIGKILL, "full", id="sigkill", marks=pytest.mark.slow),
    pytest.param("ddp", signal.SIGKILL, "full", id="ddp-sigkill", marks=pytest.mark.slow),
])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path, digits16: Path, setup: str,
                                                              sig: signal.Signals, size: str,
                                                              request: pytest.FixtureRequest) -> None:
    max_steps, kill_after, _, _ = SIZES[size]
    if setup == "buckets":
        digits16 = request.getfixturevalue("mixed16")
    straight = _straight(setup, size, tmp_path_factory, digits16)
    config = _config(tmp_path, digits16, "run", setup, size)
    run_dir = tmp_path / "run"
    workers, trainer = SETUPS[setup]
    _interrupt(config, run_dir, sig, kill_after, int(trainer.get("devices", 1)))
    saved = _load(run_dir / "checkpoints" / "last.ckpt")
    positions = saved["callbacks"]["DataPosition"]["ranks"]
    assert [p["rank"] for p in positions] == list(range(int(trainer.get("devices", 1))))
    assert all(p["consumed"] == kill_after and len(p["slots"]) == workers for p in positions)
    if setup == "buckets":  # samples waited in their bucket's buffer at the checkpoint
        assert any(len(slot["waiting"]) for p in positions for slot in p["slots"])
    _fit(config, "--resume", "last", size=size)

    a, b = _load(straight / "checkpoints" / "last.ckpt"), _load(run_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == max_steps
    ua, ub = _unet(a), _unet(b)
    weight_diff = max(float((ua[k] - ub[k]).abs().max()) for k in ua)
    ema_diff = max(float((x - y).abs().max()) for x, y in zip(a["callbacks"]["EMA"]["shadow"],
                                                               b["callbacks"]["EMA"]["shadow"]))
    losses_a, losses_b = csv_metrics(straight), csv_metrics(run_dir)
    steps = list(range(kill_after, max_steps))  # logged steps 20..39 = training steps 21..40 (full size)
    loss_diff = max(abs(losses_a[s] - losses_b[s]) for s in steps)
    print(f"{setup} {sig.name} {size}: max |U-Net weight diff| {weight_diff:.2e}, EMA {ema_diff:.2e}, "
          f"max |loss diff| steps {kill_after + 1}-{max_steps} {loss_diff:.2e}")
    assert weight_diff <= 1e-6 and ema_diff <= 1e-6
    assert loss_diff <= 1e-6, [(s, losses_a[s], losses_b[s]) for s in steps]
