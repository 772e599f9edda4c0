"""NaN/Inf steps are skipped and counted without touching weights, optimiser state or EMA;
K in a row stop the run with one clear line and the last good checkpoint intact."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, List

import lightning as L
import pytest
import torch

from mmdiff.callbacks.ema import find_ema
from mmdiff.callbacks.nan_guard import NaNGuard, grads_finite
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.run.training import build_callbacks, build_datamodule, build_system, build_trainer
from numerics_kit import FaultyToy, toy_config
from wandb_offline import read_run

pytestmark = pytest.mark.faults


@pytest.fixture(autouse=True)
def _reset_faults():
    yield
    FaultyToy.bad_steps = set()


class Recorder(L.Callback):
    """Weights, AdamW state and EMA shadow after every training batch, keyed by global step."""

    def __init__(self) -> None:
        self.states: Dict[int, Dict[str, Any]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        ema = find_ema(trainer)
        self.states[trainer.global_step] = {
            "weights": [p.detach().clone() for p in pl_module.parameters()],
            "adam": copy.deepcopy(opt.state_dict()["state"]),
            "ema": [s.clone() for s in ema.shadow] if ema is not None else None,
        }


def _fit_with_recorder(cfg_path: Path) -> tuple[Recorder, L.Trainer]:
    cfg = load_config(cfg_path, ["logger.kind=none"])
    L.seed_everything(0, verbose=False)
    system = build_system(cfg)
    recorder = Recorder()
    run_dir = Path(cfg.run_dir)
    trainer = build_trainer(cfg, run_dir, build_callbacks(cfg, run_dir, system) + [recorder], [])
    trainer.fit(system, datamodule=build_datamodule(cfg))
    return recorder, trainer


def _same(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _same_adam(a: Dict[int, Dict[str, torch.Tensor]], b: Dict[int, Dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k][name], b[k][name]) for k in a for name in a[k]
    )


def test_nonfinite_steps_are_skipped_without_touching_state(tmp_path: Path, demo_shards: Path) -> None:
    FaultyToy.bad_steps = {2, 3}  # the 3rd and 4th optimiser steps (global_step before the step)
    recorder, trainer = _fit_with_recorder(toy_config(tmp_path, demo_shards))
    states = recorder.states
    for step in (3, 4):  # states after the skipped steps equal the state before them
        before, after = states[step - 1], states[step]
        assert _same(before["weights"], after["weights"])
        assert _same_adam(before["adam"], after["adam"])
        assert _same(before["ema"], after["ema"])
    for step in (2, 5):  # good steps do move weights, AdamW state and EMA
        assert not _same(states[step - 1]["weights"], states[step]["weights"])
        assert not _same(states[step - 1]["ema"], states[step]["ema"])
    assert all(torch.isfinite(w).all() for s in states.values() for w in s["weights"])
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NaNGuard))
    assert (guard.skipped, guard.consecutive) == (2, 0)


def test_skipped_steps_are_logged_and_checkpointed(tmp_path: Path, demo_shards: Path) -> None:
    FaultyToy.bad_steps = {1, 4}
    assert main(["fit", str(toy_config(tmp_path, demo_shards))]) == 0
    lines = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("train/skipped_nonfinite")
    counts = [float(row.split(",")[col]) for row in lines[1:] if row.split(",")[col]]
    assert counts == [0.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["NaNGuard"] == {"skipped": 2, "consecutive": 0}


def test_k_bad_steps_in_a_row_stop_with_one_line(tmp_path: Path, demo_shards: Path, capsys) -> None:
    FaultyToy.bad_steps = set(range(3, 100))
    cfg = toy_config(tmp_path, demo_shards, trainer={"max_steps": 20, "max_bad_steps": 3})
    assert main(["fit", str(cfg)]) == 1
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    assert err[0].startswith("error: training stopped at step 5: 3 steps in a row had a non-finite")
    assert "trainer.max_bad_steps=3" in err[0] and f"'{last}'" in err[0]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3  # written before the bad steps; nothing saved since
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step0000003.ckpt"]


def test_a_guard_stop_finishes_the_wandb_run_as_failed(tmp_path: Path, demo_shards: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    FaultyToy.bad_steps = set(range(3, 100))
    cfg = toy_config(tmp_path, demo_shards, trainer={"max_steps": 20, "max_bad_steps": 3},
                     logger={"kind": "wandb"})
    assert main(["fit", str(cfg)]) == 1
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    logged = read_run(run)
    assert logged["exit_code"] == 1
    assert [h["train/skipped_nonfinite"] for h in logged["history"] if "train/skipped_nonfinite" in h][-1] >= 2


def test_guard_off_lets_nan_into_the_weights(tmp_path: Path, demo_shards: Path) -> None:
    """Without the guard the same fault poisons the model: what the guard is there to stop."""
    FaultyToy.bad_steps = {2}
    recorder, _ = _fit_with_recorder(toy_config(tmp_path, demo_shards, trainer={"nan_guard": False}))
    assert not all(torch.isfinite(w).all() for w in recorder.states[6]["weights"])


def test_grads_finite_sees_nan_and_inf() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    assert grads_finite(opt)  # no gradients yet
    for bad in (math.nan, math.inf, -math.inf):
        p.grad = torch.tensor([1.0, bad, 3e38])
        assert not grads_finite(opt)
    p.grad = torch.tensor([3e38, -3e38, 0.0])  # huge but finite: no overflow in the check
    assert grads_finite(opt)
