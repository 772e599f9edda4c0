"""`mmdiff bench --only ddp_callbacks`: the gate that turns callbacks on and off per batch, the
callbacks it gates, the report, and one real 2-rank run (slow; never timed)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Tuple

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from mmdiff.config import load_config
from mmdiff.errors import TrainingError
from mmdiff.jobs.bench.callback_gate import ALWAYS_HOOKS, PER_BATCH_HOOKS, CallbackGate, interleaved_schedule
from mmdiff.jobs.bench.steps import interleave_order

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs/demo/text_to_image.yaml"
RANDOM_ENCODERS = ["model.vae.pretrained=null", "model.clip.pretrained=null"]


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recorder(L.Callback):
    """Records (hook, batch index) of every per-batch hook and the names of the other hooks."""

    def __init__(self) -> None:
        self.per_batch: List[Tuple[str, int]] = []
        self.other: List[str] = []

    def _batch(self, trainer: L.Trainer) -> int:
        return trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1


for _hook in PER_BATCH_HOOKS:
    setattr(_Recorder, _hook, lambda self, trainer, *a, _h=_hook, **k: self.per_batch.append((_h, self._batch(trainer))))
for _hook in ("setup", "on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_epoch_end",
              "on_train_end", "on_fit_end", "teardown"):
    setattr(_Recorder, _hook, lambda self, *a, _h=_hook, **k: self.other.append(_h))


def test_gate_forwards_per_batch_hooks_only_in_on_batches_and_the_rest_always() -> None:
    recorder = _Recorder()
    on = [True, False, False, True, True, False]
    gate = CallbackGate([recorder], lambda i: on[i])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[gate])
    trainer.fit(_Linear(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(6, 2), batch_size=1))
    assert gate.ran == on
    on_batches = [i for i, x in enumerate(on) if x]
    for hook in PER_BATCH_HOOKS:
        assert [b for h, b in recorder.per_batch if h == hook] == on_batches, hook
    assert recorder.other == ["setup", "on_fit_start", "on_train_start", "on_train_epoch_start",
                              "on_train_epoch_end", "on_train_end", "on_fit_end", "teardown"]
    # every hook Lightning has for a callback is either gated per batch or always forwarded
    hooks = {n for n in dir(L.Callback) if n.startswith("on_") or n in ("setup", "teardown")}
    train_hooks = {n for n in hooks if not n.startswith(("on_test", "on_predict")) and "checkpoint" not in n}
    assert train_hooks == set(PER_BATCH_HOOKS) | set(ALWAYS_HOOKS)


def test_interleaved_schedule_follows_the_order_after_warmup() -> None:
    schedule = interleaved_schedule(2, interleave_order(3, 1))  # a b · b a · a b
    assert [schedule(i) for i in range(9)] == [True, True] + [True, False, False, True, True, False] + [True]


def test_gated_callbacks_are_every_per_step_callback_of_mmdiff_fit(tmp_path: Path, monkeypatch) -> None:
    """A callback `mmdiff fit` adds that works every step must be measured by the bench too."""
    import mmdiff.run.training as training
    from mmdiff.jobs.bench.ddp_callbacks import step_callbacks

    cfg = load_config(DEMO, [*RANDOM_ENCODERS, "trainer.nan_guard=true", "trainer.enable_progress_bar=false",
                             "model.use_ema=true", "trainer.exact_resume=true", "logger.kind=csv",
                             "trainer.probe_resources_every_n_steps=10", "eval.every_n_steps=0"])
    system = SimpleNamespace(ema_target=torch.nn.Linear(1, 1))
    trainer = training.build_trainer(cfg, tmp_path, training.build_callbacks(cfg, tmp_path, system), [])
    # every N steps only (checkpoints, previews, evaluation, resources) or Lightning's own
    not_per_step = {"ImageLoggingCallback", "ImageEvalCallback", "ResourceProbe"}
    fits = [type(cb).__name__ for cb in trainer.callbacks
            if type(cb).__module__.startswith("mmdiff.") and type(cb).__name__ not in not_per_step]
    assert sorted(type(cb).__name__ for cb in step_callbacks(cfg)) == sorted(fits)


def test_a_failed_rank_is_one_training_error(monkeypatch) -> None:
    from mmdiff.jobs.bench import ddp_callbacks

    def fail(*args: Any, **kwargs: Any) -> None:
        raise mp.ProcessRaisedException("Traceback (most recent call last):\n  ...\nRuntimeError: gloo: no route", 1, 99)

    monkeypatch.setattr(ddp_callbacks.mp, "start_processes", fail)
    cfg = load_config(DEMO, RANDOM_ENCODERS)
    with pytest.raises(TrainingError, match=r"^the 2-rank DDP bench failed on rank 1: RuntimeError: gloo: no route$"):
        ddp_callbacks._run_ranks(cfg, {})


def _synthetic(overhead: float) -> dict:
    row = {"step_s": 0.5, "images_per_s": 256.0, "step_cpu_s": 0.4,
           "spread": {"q1": 0.45, "median": 0.5, "q3": 0.55}}
    return {"world_size": 2, "backend": "gloo", "threads_per_rank": 1, "batch_size_per_rank": 64, "mode": "online",
            "rounds": 2, "pairs_per_round": 5, "block": 2, "on": row, "off": row, "overhead": overhead,
            "overhead_cpu": 1.01, "ratio": {"q1": 0.99, "q3": 1.04, "n": 10, "by_round": [1.0, 1.02]},
            "verdict": {"text": "judged: ±2.0 % (95 %)"}, "callbacks": ["NaNGuard", "EMACallback"]}


def test_targets_and_table_of_the_section() -> None:
    from mmdiff.jobs.bench import format_table, targets

    env = {"environment": {"device": "cpu", "torch": "x", "threads": 1},
           "config": {"name": "t2i", "batch_size": 64, "image_size": 32, "precision": "32-true"}}
    assert targets({**env, "ddp_callbacks": _synthetic(1.02)}) == {
        "ddp_callbacks_overhead<=1.05": True, "ddp_callbacks_overhead_cpu_time<=1.05": True}
    assert not targets({**env, "ddp_callbacks": _synthetic(1.08)})["ddp_callbacks_overhead<=1.05"]
    assert targets({**env, "ddp_callbacks": {"error": "rank 1 failed"}}) == {}
    table = format_table({**env, "ddp_callbacks": _synthetic(1.02)})
    assert "callbacks on" in table and "callbacks off" in table and "on/off 1.020" in table
    assert "judged: ±2.0 %" in table and "NaNGuard, EMACallback" in table
    assert "skipped (rank 1 failed)" in format_table({**env, "ddp_callbacks": {"error": "rank 1 failed"}})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_rank_run_gates_the_same_steps_on_both_ranks(tiny_cfg_path: Path) -> None:
    from mmdiff.jobs.bench import format_table, run_bench

    cfg = load_config(tiny_cfg_path)
    result = run_bench(cfg, steps=2, warmup=1, rounds=2, block=1, sections=["ddp_callbacks"], threads=1)
    dc = result["ddp_callbacks"]
    assert "error" not in dc, dc
    order = interleave_order(4, 1)  # 2 rounds x 2 pairs of 1 step
    expected = [side == "a" for side, _ in order]
    assert dc["on_by_rank"] == [expected, expected]  # both ranks: the same batches on, in the order
    assert dc["on"]["steps"] == dc["off"]["steps"] == 4
    assert dc["ratio"]["n"] == 4 and len(dc["ratio"]["by_round"]) == 2 and dc["overhead"] > 0
    assert dc["callbacks"] == ["DataStatsCallback", "NaNGuard", "ProgressLogCallback", "EMACallback",
                               "DataPositionCallback", "StepSeedCallback", "RequeueOnSignal"]
    assert dc["world_size"] == 2 and dc["threads_per_rank"] == 1 and "verdict" in dc
    assert "train" not in result and "ddp_callbacks_overhead<=1.05" in result["targets"]
    assert "callbacks on" in format_table(result)
