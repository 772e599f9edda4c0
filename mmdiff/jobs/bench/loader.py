"""The real data pipeline: images/s of the config's ShardDataModule alone (and with aspect-ratio
buckets beside the square path, interleaved), and ``Trainer.fit`` with it (its workers running
alongside the step)."""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from mmdiff.data.datamodule import ShardDataModule
from mmdiff.data.precomputed import check_against, read_metadata
from mmdiff.errors import MmdiffError
from mmdiff.jobs.bench.spread import grouped_ratios, summary
from mmdiff.jobs.bench.steps import framework_steps, interleave_order
from mmdiff.jobs.bench.timing import train_row

log = logging.getLogger(__name__)


def _loader_rows(data_cfg: DictConfig, workers_list: Sequence[int], seed: int, *, batches: int,
                 warmup: int) -> Dict[str, Any]:
    rows: Dict[str, Any] = {}
    for workers in workers_list:
        data = OmegaConf.merge(data_cfg, {"num_workers": workers, "steps_per_epoch": warmup + batches + 8})
        dm = ShardDataModule(data, seed=seed)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        n_images = 0
        for _ in range(max(warmup, workers)):  # worker start-up and shuffle-buffer fill
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            n_images += len(next(it)["caption"])
        elapsed = time.perf_counter() - start
        del it
        rows[str(workers)] = {"workers": workers, "images_per_s": n_images / elapsed,
                              "batch_s": elapsed / batches, "batches": batches}
    return rows


def square_data(data_cfg: DictConfig) -> DictConfig:
    """``data:`` with aspect-ratio buckets off (every image resized and cropped to image_size²)."""
    off = {"enabled": False, "area": None, "max_aspect": None, "sizes": []}
    return OmegaConf.merge(data_cfg, {"buckets": off})  # type: ignore[return-value]


def bucket_data(data_cfg: DictConfig, step: int) -> DictConfig:
    """``data:`` with aspect-ratio buckets on: the config's own set when it has one, else the set of
    an ``image_size``² pixel budget with sides multiples of ``step`` (the sizes the model takes)."""
    if data_cfg.buckets.enabled:
        return data_cfg
    return OmegaConf.merge(data_cfg, {"buckets": {"enabled": True, "step": int(step)}})  # type: ignore[return-value]


def bucket_rows(data_cfg: DictConfig, step: int, seed: int, *, batches: int, warmup: int,
                block: int = 2) -> Dict[str, Any]:
    """The square loader and the bucketed one (:func:`bucket_data`) over the same shards, without
    workers, read in alternating blocks of ``block`` batches (``a a b b · b b a a …``, as the
    training rows) so both see the same machine state; every batch is timed. ``ratio`` is the
    median over pairs of square / bucketed batch time: the bucketed loader's images/s relative
    to the square one's (the batch size is the same)."""
    sides = {"square": square_data(data_cfg), "buckets": bucket_data(data_cfg, step)}
    pairs = max(1, batches // block)
    epoch = {"num_workers": 0, "steps_per_epoch": warmup + pairs * block + 8}
    modules = {name: ShardDataModule(OmegaConf.merge(data, epoch), seed=seed) for name, data in sides.items()}
    iters = {}
    for name, dm in modules.items():
        dm.setup("fit")
        iters[name] = iter(dm.train_dataloader())
        for _ in range(warmup):  # shuffle-buffer fill (and, with buckets, the shape buffers)
            next(iters[name])
    times: Dict[str, list] = {name: [] for name in sides}
    groups: Dict[str, list] = {name: [] for name in sides}
    images: Counter = Counter()
    shapes: Counter = Counter()
    for side, pair in interleave_order(pairs, block):
        name = "square" if side == "a" else "buckets"
        start = time.perf_counter()
        batch = next(iters[name])
        times[name].append(time.perf_counter() - start)
        groups[name].append(pair)
        images[name] += len(batch["caption"])
        if name == "buckets":
            shapes["x".join(str(v) for v in batch["image"].shape[:-3:-1])] += 1  # WxH
    del iters
    ratio = summary(grouped_ratios(times["square"], groups["square"], times["buckets"], groups["buckets"]))
    rows = {name: {"images_per_s": images[name] / sum(times[name]), "batch_s": summary(times[name])["median"],
                   "batches": len(times[name]), "batch_times_s": times[name], "pair": groups[name]}
            for name in sides}
    rows["buckets"].update({"sizes": modules["buckets"].buckets.describe(), "batches_by_shape": dict(shapes)})
    return {**rows, "ratio": ratio, "throughput_ratio": ratio["median"], "block": block,
            "what": "0 workers, square vs bucketed batches read in alternating blocks from the same shards"}


def precomputed_data(data_cfg: DictConfig, folder: str | Path) -> DictConfig:
    """``data:`` reading an ``mmdiff precompute`` folder instead of the image shards."""
    folder = Path(folder).expanduser().resolve()
    meta = read_metadata(folder)
    return OmegaConf.merge(data_cfg, {  # type: ignore[return-value]
        "train_shards": [str(folder / "train-*.tar")], "val_shards": [], "load_images": False,
        "caption_key": "txt", "array_keys": list(meta["array_keys"])})


def bench_loader(cfg: DictConfig, *, batches: int, warmup: int, precomputed_dir: Optional[str] = None,
                 bucket_step: Optional[int] = None, block: int = 2) -> Dict[str, Any]:
    """Images/s of the config's ShardDataModule alone, without workers and with data.num_workers
    (and of the same loader over an ``mmdiff precompute`` folder, when given); with
    ``bucket_step``, the square and the bucketed loader side by side (:func:`bucket_rows`)."""
    workers = sorted({0, int(cfg.data.num_workers)})
    rows = _loader_rows(cfg.data, workers, cfg.seed, batches=batches, warmup=warmup)
    out = {"by_workers": rows, "per_worker_images_per_s": rows["0"]["images_per_s"],
           "what": "ShardDataModule.train_dataloader(): read, shuffle, decode, resize/crop, collate"}
    if precomputed_dir:
        out["precomputed_by_workers"] = _loader_rows(precomputed_data(cfg.data, precomputed_dir), workers,
                                                     cfg.seed, batches=batches, warmup=warmup)
    if bucket_step:
        try:
            out["buckets"] = bucket_rows(cfg.data, bucket_step, cfg.seed, batches=batches, warmup=warmup,
                                         block=block)
        except MmdiffError as err:  # e.g. no bucket fits image_size² at this step: the rest still stands
            log.warning("bench: loader with buckets skipped: %s", err)
            out["buckets"] = {"error": str(err)}
    return out


def bench_fit(system: Any, cfg: DictConfig, device: torch.device, *, steps: int, warmup: int,
              precomputed_dir: Optional[str] = None) -> Dict[str, Any]:
    """``Trainer.fit`` with the real ShardDataModule (``data.num_workers`` workers running alongside
    the step, as in ``mmdiff fit``): the config's image shards with online encoding, and the
    shards of ``precomputed_dir`` (an ``mmdiff precompute`` folder of this config) when given."""
    bs = int(cfg.data.batch_size)
    big = {"steps_per_epoch": max(int(cfg.data.steps_per_epoch), warmup + steps + 8)}
    runs = [("online", OmegaConf.merge(cfg.data, big))]
    if precomputed_dir:
        runs.append(("precomputed", OmegaConf.merge(precomputed_data(cfg.data, precomputed_dir), big)))
        try:
            system._empty_states = check_against(system, Path(precomputed_dir).expanduser().resolve())
        except MmdiffError as err:  # other weights: timings are still right
            log.warning("bench: %s (timing anyway)", err)
    out: Dict[str, Any] = {"batch_size": bs, "num_workers": int(cfg.data.num_workers),
                           "what": "Trainer.fit with the real ShardDataModule and its workers; "
                                   "otherwise as train.framework"}
    for mode, data in runs:
        system.precomputed = mode == "precomputed"
        log.info("bench: fit with the data module, %s", mode)
        times = framework_steps(system, cfg, None, steps, warmup, device,
                                datamodule=ShardDataModule(data, seed=cfg.seed))
        out[mode] = train_row(times, bs)
    system.precomputed = bool(cfg.model.precomputed)
    if "precomputed" in out:
        out["precomputed_speedup"] = out["online"]["step_s"] / out["precomputed"]["step_s"]
        out["precomputed_speedup_cpu"] = out["online"]["step_cpu_s"] / out["precomputed"]["step_cpu_s"]
    return out
