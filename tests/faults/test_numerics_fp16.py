"""fp16 overflow belongs to the gradient scaler: it skips and lowers the scale; NaNGuard does not
count those steps (it would stop a healthy fp16 run otherwise), but does count a NaN loss.

Lightning turns ``precision="16-mixed"`` into ``bf16-mixed`` on CPU, so these tests hand the
Trainer Lightning's ``MixedPrecision`` plugin with a CPU ``GradScaler`` directly: the same code
path a GPU run takes (scaler.unscale_ → on_before_optimizer_step → scaler.step / update).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from mmdiff.callbacks.nan_guard import NaNGuard, NonFiniteTrainingError
from mmdiff.config import load_config
from mmdiff.run.training import build_datamodule, build_system
from numerics_kit import FaultyToy, toy_config

pytestmark = pytest.mark.faults

INIT_SCALE = 2.0**30  # far too large: the first steps' fp16 gradients overflow


@pytest.fixture(autouse=True)
def _reset_faults():
    yield
    FaultyToy.bad_steps = set()


def _fit_fp16(tmp_path: Path, shards: Path, guard: NaNGuard, max_steps: int, fused: bool):
    cfg = load_config(toy_config(tmp_path, shards), ["logger.kind=none", f"trainer.max_steps={max_steps}",
                                                     f"trainer.fused_adamw={fused}"])
    system = build_system(cfg)
    start = [p.detach().clone() for p in system.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[guard])
    trainer.fit(system, datamodule=build_datamodule(cfg))
    return system, start, scaler


# A fused AdamW is unscaled inside scaler.step, a plain one by Lightning before the guard runs.
FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])


@FUSED
def test_fp16_overflow_is_left_to_the_scaler(tmp_path: Path, demo_shards: Path, fused: bool) -> None:
    guard = NaNGuard(max_bad_steps=3)
    system, start, scaler = _fit_fp16(tmp_path, demo_shards, guard, max_steps=30, fused=fused)
    assert scaler.get_scale() < INIT_SCALE / 2**8  # the scaler saw the overflows and backed off
    assert guard.skipped == 0  # ... and they were not counted as bad steps
    params = list(system.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert not all(torch.equal(p, s) for p, s in zip(params, start))  # later steps did train


@FUSED
def test_nan_loss_under_the_scaler_still_counts(tmp_path: Path, demo_shards: Path, fused: bool) -> None:
    FaultyToy.bad_steps = set(range(25, 100))
    with pytest.raises(NonFiniteTrainingError, match="3 steps in a row"):
        _fit_fp16(tmp_path, demo_shards, NaNGuard(max_bad_steps=3), max_steps=40, fused=fused)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true", "64"])
def test_whole_model_precisions_are_refused_in_one_line(tmp_path: Path, demo_shards: Path, capsys,
                                                        precision: str) -> None:
    from mmdiff.cli import main

    assert main(["fit", str(toy_config(tmp_path, demo_shards)), f"trainer.precision={precision}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"trainer.precision={precision} is not supported" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
