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

from conftest import clean_env, csv_metrics
from tiny_configs import tiny_t2i_config

MAX_STEPS, KILL_AFTER = 40, 20


SETUPS = {  # name: (DataLoader workers, trainer overrides)
    "single": (2, {}),
    "ddp": (1, {"devices": "2", "strategy": "ddp"}),
}


def _config(tmp_path: Path, shards: Path, run: str, setup: str = "single") -> Path:
    workers, trainer = SETUPS[setup]
    return tiny_t2i_config(
        tmp_path, shards, run,
        data={"num_workers": workers, "steps_per_epoch": 13, "shuffle_buffer": 30, "crop": "random",
              "random_flip": True},
        model={"caption_dropout": 0.2, "vae": {"pretrained": None, "block_out_channels": [32, 32],
                                               "scale_estimate_batches": 1}},
        trainer={"max_steps": MAX_STEPS, "checkpoint_every_n_steps": KILL_AFTER, "val_every_n_steps": 10,
                 **trainer},
    )


def _fit(config: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "mmdiff.cli", "fit", str(config), *extra], env=clean_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def _load(path: Path) -> Dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _unet(ckpt: Dict) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}


_STRAIGHT: Dict[str, Path] = {}


def _straight(setup: str, tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """The uninterrupted 40-step run of ``setup`` (made once per session)."""
    if setup not in _STRAIGHT:
        tmp = tmp_path_factory.mktemp(f"straight-{setup}")
        _fit(_config(tmp, shards, "run", setup))
        _STRAIGHT[setup] = tmp / "run"
    return _STRAIGHT[setup]


def _interrupt(config: Path, run_dir: Path, sig: signal.Signals) -> None:
    """Start the run, wait for its step-20 checkpoint (last.ckpt readable), then send ``sig``."""
    proc = subprocess.Popen([sys.executable, "-m", "mmdiff.cli", "fit", str(config)], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, f"the run ended before it was interrupted:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no step-20 checkpoint after 300 s"
            if last.is_file():
                try:
                    if _load(last)["global_step"] == KILL_AFTER:
                        break
                except Exception:  # still being written
                    pass
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
    assert _load(last)["global_step"] == KILL_AFTER, "the run trained on to its next checkpoint"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("setup, sig", [("single", signal.SIGTERM), ("single", signal.SIGKILL),
                                        ("ddp", signal.SIGKILL)], ids=["sigterm", "sigkill", "ddp-sigkill"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path, digits16: Path, setup: str,
                                                              sig: signal.Signals) -> None:
    straight = _straight(setup, tmp_path_factory, digits16)
    config = _config(tmp_path, digits16, "run", setup)
    run_dir = tmp_path / "run"
    _interrupt(config, run_dir, sig)
    saved = _load(run_dir / "checkpoints" / "last.ckpt")
    workers, trainer = SETUPS[setup]
    positions = saved["callbacks"]["DataPosition"]["ranks"]
    assert [p["rank"] for p in positions] == list(range(int(trainer.get("devices", 1))))
    assert all(p["consumed"] == KILL_AFTER and len(p["slots"]) == workers for p in positions)
    _fit(config, "--resume", "last")

    a, b = _load(straight / "checkpoints" / "last.ckpt"), _load(run_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    ua, ub = _unet(a), _unet(b)
    weight_diff = max(float((ua[k] - ub[k]).abs().max()) for k in ua)
    ema_diff = max(float((x - y).abs().max()) for x, y in zip(a["callbacks"]["EMA"]["shadow"],
                                                               b["callbacks"]["EMA"]["shadow"]))
    losses_a, losses_b = csv_metrics(straight), csv_metrics(run_dir)
    steps = list(range(KILL_AFTER, MAX_STEPS))  # logged steps 20..39 = training steps 21..40
    loss_diff = max(abs(losses_a[s] - losses_b[s]) for s in steps)
    print(f"{setup} {sig.name}: max |U-Net weight diff| {weight_diff:.2e}, EMA {ema_diff:.2e}, "
          f"max |loss diff| steps 21-40 {loss_diff:.2e}")
    assert weight_diff <= 1e-6 and ema_diff <= 1e-6
    assert loss_diff <= 1e-6, [(s, losses_a[s], losses_b[s]) for s in steps]
