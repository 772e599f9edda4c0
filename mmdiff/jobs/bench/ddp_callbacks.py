"""The ``ddp_callbacks`` section: what mmdiff's per-step callbacks cost a 2-rank DDP step on CPU.

Two processes (``torch.multiprocessing``, spawned; gloo on a free local port) each run one
``Trainer.fit`` of the config's system under Lightning's DDP over a fixed in-memory batch per rank
(``data.batch_size``), the step bench-style (no logger, checkpoints, previews or validation).
mmdiff's per-step callbacks (:func:`step_callbacks`: NaN guard, data statistics, requeue flag,
data position and step seed, EMA, progress log) sit behind a :class:`CallbackGate` that turns them
on and off in blocks of steps (:func:`~mmdiff.jobs.bench.steps.interleave_order`: ``on on off off
· off off on on · …``), the same batches on both ranks, so their collectives always pair up and
both sides see the same machine state. A step is timed on each rank from the end of the previous
step to the end of this one's ``on_train_batch_end`` (the gated callbacks' work included); the
step time is the mean over the ranks.

``overhead`` = on/off: the median over pairs of the pair's median on-step / median off-step, with
its spread and the verdict of :func:`~mmdiff.jobs.bench.spread.judge`. A round here is ``pairs``
consecutive pairs of the one fit. The batch carries the loader's per-batch skip counters, so the
data-statistics callback does its real work; the step encodes online, or trains from the
precomputed arrays when the config's ``model.precomputed`` is set.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.plugins.environments import LightningEnvironment
from omegaconf import DictConfig

from mmdiff.callbacks.data_position import DataPositionCallback, StepSeedCallback
from mmdiff.callbacks.data_stats import DataStatsCallback
from mmdiff.callbacks.ema import EMACallback
from mmdiff.callbacks.nan_guard import NaNGuard
from mmdiff.callbacks.progress import ProgressLogCallback
from mmdiff.callbacks.requeue import RequeueOnSignal
from mmdiff.errors import TrainingError
from mmdiff.jobs.bench.batches import RepeatBatch, bench_system, make_batch, precomputed_batch, use_stored_arrays
from mmdiff.jobs.bench.callback_gate import CallbackGate, interleaved_schedule
from mmdiff.jobs.bench.spread import grouped_ratios, judge, summary
from mmdiff.jobs.bench.steps import StepTimer, interleave_order
from mmdiff.jobs.bench.timing import intervals, loadavg, train_row

log = logging.getLogger(__name__)

WORLD_SIZE = 2


def step_callbacks(cfg: DictConfig) -> List[L.Callback]:
    """mmdiff's callbacks that work on every training batch, as ``mmdiff fit`` builds them
    (:func:`mmdiff.run.training.build_callbacks` and ``build_trainer``, with every switch on and
    the signal flag as under SLURM, without the requeue itself), in that order. Left out: checkpointing,
    previews, periodic evaluation, the LR monitor and the resource probe, which work only every
    N steps or need a logger."""
    t = cfg.trainer
    return [DataStatsCallback(), NaNGuard(max_bad_steps=t.max_bad_steps),
            ProgressLogCallback(every_n_steps=t.log_every_n_steps), EMACallback(decay=cfg.model.ema_decay),
            DataPositionCallback(), StepSeedCallback(cfg.seed), RequeueOnSignal(requeue_signal=None)]


def _rank_batch(system: Any, cfg: DictConfig, precomputed: bool) -> Dict[str, Any]:
    """The fixed batch of one rank, with the skip counters the real loader adds to every batch."""
    bs = int(cfg.data.batch_size)
    batch = make_batch(cfg, bs)
    if precomputed:
        batch = precomputed_batch(system, batch)
        use_stored_arrays(system)
    system.precomputed = precomputed
    return {**batch, "skipped": torch.zeros(bs, dtype=torch.long), "worker": torch.zeros(bs, dtype=torch.long)}


def _rank_main(rank: int, port: int, cfg: DictConfig, opts: Dict[str, Any], out_dir: str) -> None:
    """One rank: the gated fit; writes its step stamps and gate record to ``out_dir/rankN.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(int(opts["threads"]))
    L.seed_everything(cfg.seed, verbose=False)
    device = torch.device("cpu")
    system = bench_system(cfg, device)
    batch = _rank_batch(system, cfg, bool(opts["precomputed"]))
    order = [tuple(x) for x in opts["order"]]
    n = opts["warmup"] + len(order)
    gate = CallbackGate(step_callbacks(cfg), interleaved_schedule(opts["warmup"], order))
    timer = StepTimer(device)  # last: its stamp comes after the gated callbacks' batch end
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, num_nodes=1, strategy="ddp",
        plugins=[LightningEnvironment()],  # the ranks made here, whatever cluster this runs inside
        max_steps=n, precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[gate, timer],
    )
    trainer.fit(system, train_dataloaders=torch.utils.data.DataLoader(RepeatBatch(batch, n), batch_size=None))
    record = {"rank": rank, "stamps": timer.stamps, "ran": gate.ran,
              "callbacks": [type(cb).__name__ for cb in gate.callbacks]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(cfg: DictConfig, opts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Spawn the ranks and return what each wrote; a failed rank ends in one :class:`TrainingError`."""
    with tempfile.TemporaryDirectory(prefix="mmdiff-bench-ddp-") as tmp:
        try:
            mp.start_processes(_rank_main, args=(_free_port(), cfg, opts, tmp), nprocs=WORLD_SIZE,
                               start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise TrainingError(f"the {WORLD_SIZE}-rank DDP bench failed on rank {err.error_index}: {last}") from err
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def bench_ddp_callbacks(cfg: DictConfig, *, steps: int, warmup: int, rounds: int, block: int = 2,
                        threads: Optional[int] = None, precomputed: bool = False) -> Dict[str, Any]:
    """Step time of a 2-rank DDP CPU fit with mmdiff's per-step callbacks on and off, interleaved
    (module docstring): per side the median, IQR and images/s over both ranks, and the on/off
    ratio with its spread and verdict. ``threads`` per rank (default: the CPUs shared out)."""
    block = max(1, int(block))
    warm = max(1, int(warmup))
    pairs = max(1, math.ceil(steps / block))
    order = interleave_order(rounds * pairs, block)
    per_rank = int(threads) if threads else max(1, (os.cpu_count() or WORLD_SIZE) // WORLD_SIZE)
    opts = {"order": order, "warmup": warm, "threads": per_rank, "precomputed": bool(precomputed)}
    log.info("bench: %d-rank DDP, callbacks on/off (%d rounds x %d pairs of %d steps, %d thread(s) per rank)",
             WORLD_SIZE, rounds, pairs, block, per_rank)
    loads = [x[0] for x in [loadavg()] if x]
    ranks = _run_ranks(cfg, opts)
    loads += [x[0] for x in [loadavg()] if x]
    per_rank_times = [intervals([tuple(s) for s in r["stamps"]], warm) for r in ranks]
    sides: Dict[str, Dict[str, List[float]]] = {s: {"wall": [], "cpu": [], "pair": []} for s in ("a", "b")}
    for j, (side, pair) in enumerate(order):
        for kind in ("wall", "cpu"):
            sides[side][kind].append(sum(t[kind][j] for t in per_rank_times) / WORLD_SIZE)
        sides[side]["pair"].append(pair)
    a, b = sides["a"], sides["b"]
    images = int(cfg.data.batch_size) * WORLD_SIZE
    on, off = train_row(a, images), train_row(b, images)
    on["spread"], off["spread"] = summary(a["wall"]), summary(b["wall"])
    ratios = grouped_ratios(a["wall"], a["pair"], b["wall"], b["pair"])
    by_round = grouped_ratios(a["wall"], [p // pairs for p in a["pair"]], b["wall"], [p // pairs for p in b["pair"]])
    load = max(loads) if loads else None
    return {
        "world_size": WORLD_SIZE, "backend": "gloo", "threads_per_rank": per_rank,
        "batch_size_per_rank": int(cfg.data.batch_size), "mode": "precomputed" if precomputed else "online",
        "block": block, "pairs_per_round": pairs, "rounds": rounds, "load_1min_max": load,
        "callbacks": ranks[0]["callbacks"],
        "on_by_rank": [[bool(x) for x in r["ran"][warm:]] for r in ranks],
        "on": on, "off": off, "overhead": summary(ratios)["median"],
        "overhead_cpu": summary(grouped_ratios(a["cpu"], a["pair"], b["cpu"], b["pair"]))["median"],
        "ratio": {**summary(ratios), "pairs": [round(x, 4) for x in ratios],
                  "by_round": [round(x, 4) for x in by_round]},
        "verdict": judge(ratios, per_round=pairs, rounds=rounds, load=load, cpus=os.cpu_count()),
        "what": "2 ranks x Trainer.fit under DDP (gloo) on a fixed batch per rank; mmdiff's per-step "
                "callbacks forwarded (on) or not (off) in interleaved blocks of steps",
    }
