"""The training-step runners — ``Trainer.fit`` of the real system (a) and a hand-written loop (b)
over the same modules — and the ``train`` section that interleaves them."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig

from mmdiff.callbacks.ema import EMACallback
from mmdiff.jobs.bench.batches import RepeatBatch, make_batch, pinned, precision_context, precomputed_batch, use_stored_arrays
from mmdiff.jobs.bench.spread import grouped_ratios, judge, summary
from mmdiff.jobs.bench.timing import Times, intervals, loadavg, stamp, sync, train_row
from mmdiff.models.vae import encode_finite
from mmdiff.systems.optim import configure_adamw, fused_adamw_setting

log = logging.getLogger(__name__)


class StepTimer(L.Callback):
    """Timestamps after each optimiser step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: List[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.stamps.append(stamp())


def _fit(system: Any, cfg: DictConfig, batch: Optional[Dict[str, Any]], n: int, device: torch.device,
         callbacks: List[Any], datamodule: Any = None) -> None:
    """``Trainer.fit`` for ``n`` steps, bench-style (no logger, checkpoints, validation), over the
    fixed in-memory ``batch`` or the real ``datamodule``."""
    callbacks = list(callbacks)
    if cfg.model.use_ema:
        callbacks.insert(0, EMACallback(decay=cfg.model.ema_decay))
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_steps=n,
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    if datamodule is not None:
        trainer.fit(system, datamodule=datamodule)
    else:
        assert batch is not None
        loader = torch.utils.data.DataLoader(RepeatBatch(pinned(batch, device), n), batch_size=None)
        trainer.fit(system, train_dataloaders=loader)
    system.to(device)  # Lightning's teardown moves a GPU model back to the CPU


def framework_steps(system: Any, cfg: DictConfig, batch: Optional[Dict[str, Any]], steps: int,
                    warmup: int, device: torch.device, datamodule: Any = None) -> Times:
    """Step times of ``Trainer.fit`` on ``system``: over a fixed in-memory ``batch`` (see the
    module docstring), or with a real ``datamodule`` (its loader workers run alongside)."""
    timer = StepTimer(device)
    _fit(system, cfg, batch, max(1, warmup) + steps, device, [timer], datamodule)
    return intervals(timer.stamps, warmup)


class PlainLoop:
    """A minimal hand-written training loop over the system's modules, batch and precision: one
    :meth:`step` at a time, so it can be interleaved with the framework's steps."""

    def __init__(self, system: Any, cfg: DictConfig, batch: Dict[str, Any], device: torch.device,
                 precomputed: bool) -> None:
        self.system, self.cfg, self.device, self.precomputed = system, cfg, device, precomputed
        self.params = [p for p in system.unet.parameters() if p.requires_grad]
        optimiser = configure_adamw(self.params, cfg.optim, cfg.trainer.max_steps,
                                    fused=fused_adamw_setting(cfg.trainer))
        self.opt, self.sched = optimiser["optimizer"], optimiser["lr_scheduler"]["scheduler"]
        self.ema = [p.detach().float().clone() for p in self.params] if cfg.model.use_ema else None
        self.alpha_bar = system.diffusion.schedule.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.scale = float(system.latent_scale) or 1.0
        self.precision = str(cfg.trainer.precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision.startswith("16") else None
        self.channels_last = bool(system.speed.get("channels_last"))
        self.use_pooled = bool(cfg.model.unet.use_pooled_text)
        self.source = pinned(batch, device)
        self.count = 0

    def step(self) -> None:
        """One optimiser step (finished on the device when it returns)."""
        system, cfg, device = self.system, self.cfg, self.device
        unet = system.unet
        unet.train()
        b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
             for k, v in self.source.items()}
        with torch.no_grad():
            if self.precomputed:
                mean = b["latent"].float()
                x0 = (mean + torch.exp(0.5 * b["latent_logvar"].float()) * torch.randn_like(mean)) * self.scale
                context, pooled = b["context"].float(), b["pooled"].float()
            else:
                x0 = encode_finite(system.vae, b["image"]).sample().float() * self.scale
                context, pooled = system.clip.encode_text(system.clip.tokenize(b["caption"]).to(device))
        t = torch.randint(0, self.alpha_bar.shape[0], (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with precision_context(self.precision, device):
            pred = unet(x_t, t, encoder_hidden_states=context,
                        class_labels=pooled if self.use_pooled else None).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if cfg.trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.trainer.gradient_clip_val)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        if self.ema is not None:
            decay = min(cfg.model.ema_decay, (2 + self.count) / (11 + self.count))
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1.0 - decay)
        self.count += 1
        sync(device)


def plain_steps(system: Any, cfg: DictConfig, batch: Dict[str, Any], steps: int, warmup: int,
                device: torch.device, precomputed: bool) -> Times:
    """Step times of a minimal hand-written loop over the same modules, batch and precision."""
    loop = PlainLoop(system, cfg, batch, device, precomputed)
    stamps: List[tuple[float, float]] = []
    for _ in range(max(1, warmup) + steps):
        loop.step()
        stamps.append(stamp())
    return intervals(stamps, warmup)


def interleave_order(pairs: int, block: int) -> List[tuple[str, int]]:
    """The order of the timed steps: ``pairs`` pairs of ``block`` framework ("a") and ``block`` plain
    ("b") steps, as (side, pair) in time order. Pairs alternate ab, ba, ab, … (a b b a a b …) so
    neither side always runs first (caches, clock boosts, a neighbour's burst all cancel)."""
    order: List[tuple[str, int]] = []
    for i in range(pairs):
        sides = ("a", "b") if i % 2 == 0 else ("b", "a")
        for side in sides:
            order += [(side, i)] * block
    return order


class _Interleaver(L.Callback):
    """Runs and times the plain loop's steps between the framework's, in :func:`interleave_order`.

    A framework step is the interval from the end of whatever ran before it (the previous
    framework step or a plain block) to its ``on_train_batch_end``; a plain step is one
    :meth:`PlainLoop.step`. The first ``warmup`` framework steps and as many plain steps are not
    timed (the plain warm-up runs at ``on_train_start``).
    """

    def __init__(self, loop: PlainLoop, order: List[tuple[str, int]], warmup: int, device: torch.device) -> None:
        self.loop, self.order, self.warmup, self.device = loop, order, max(1, warmup), device
        self.ptr, self.seen = 0, 0
        self.start: tuple[float, float] = stamp()
        self.times: Dict[str, Dict[str, List[float]]] = {
            s: {"wall": [], "cpu": [], "pair": []} for s in ("a", "b")}
        self.ran: List[tuple[str, int]] = []  # the timed steps in the order they ran

    def on_train_start(self, trainer, pl_module) -> None:
        for _ in range(self.warmup):
            self.loop.step()

    def _record(self, side: str, pair: int, a: tuple[float, float], b: tuple[float, float]) -> None:
        t = self.times[side]
        t["wall"].append(b[0] - a[0])
        t["cpu"].append(b[1] - a[1])
        t["pair"].append(pair)
        self.ran.append((side, pair))

    def _plain_block(self) -> None:
        while self.ptr < len(self.order) and self.order[self.ptr][0] == "b":
            before = stamp()
            self.loop.step()
            self._record("b", self.order[self.ptr][1], before, stamp())
            self.ptr += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        now = stamp()
        self.seen += 1
        if self.seen > self.warmup and self.ptr < len(self.order):
            self._record("a", self.order[self.ptr][1], self.start, now)
            self.ptr += 1
        if self.seen >= self.warmup:
            self._plain_block()
        self.start = stamp()


def interleaved_steps(system: Any, cfg: DictConfig, batch: Dict[str, Any], *, pairs: int, block: int,
                      warmup: int, device: torch.device, precomputed: bool) -> Dict[str, Any]:
    """One ``Trainer.fit`` (a) with the plain loop (b) run between its steps: per side the wall
    and CPU seconds of each timed step and the pair it belongs to; under ``order`` the (side, pair)
    of each timed step as it ran."""
    order = interleave_order(pairs, block)
    inter = _Interleaver(PlainLoop(system, cfg, batch, device, precomputed), order, warmup, device)
    n_a = sum(1 for side, _ in order if side == "a")
    _fit(system, cfg, batch, max(1, warmup) + n_a, device, [inter])
    return {**inter.times, "order": inter.ran}


def bench_train(system: Any, cfg: DictConfig, device: torch.device, *, steps: int, warmup: int,
                rounds: int, block: int = 2) -> Dict[str, Any]:
    """Framework vs plain loop, online vs precomputed (see the package docstring): per round and
    mode one ``Trainer.fit`` with the plain loop interleaved in blocks of ``block`` steps."""
    bs = int(cfg.data.batch_size)
    block = max(1, int(block))
    pairs = max(1, math.ceil(steps / block))
    online = make_batch(cfg, bs)
    system.precomputed = False
    pre = precomputed_batch(system, {"image": online["image"].to(device), "caption": online["caption"]})
    use_stored_arrays(system)
    raw: Dict[str, Dict[str, Dict[str, List[float]]]] = {
        m: {s: {"wall": [], "cpu": [], "pair": []} for s in ("a", "b")} for m in ("online", "precomputed")}
    memory: Dict[str, float] = {}
    loads = [x[0] for x in [loadavg()] if x]
    for r in range(rounds):
        for mode, batch in (("online", online), ("precomputed", pre)) if r % 2 == 0 else (
                ("precomputed", pre), ("online", online)):
            system.precomputed = mode == "precomputed"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            log.info("bench: train %s, round %d/%d (%d pairs of %d steps)", mode, r + 1, rounds, pairs, block)
            got = interleaved_steps(system, cfg, batch, pairs=pairs, block=block, warmup=warmup,
                                    device=device, precomputed=mode == "precomputed")
            for side in ("a", "b"):
                raw[mode][side]["wall"] += got[side]["wall"]
                raw[mode][side]["cpu"] += got[side]["cpu"]
                raw[mode][side]["pair"] += [r * pairs + p for p in got[side]["pair"]]
            if device.type == "cuda":
                key = f"train_{mode}_cuda_max_allocated_mb"
                memory[key] = max(memory.get(key, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    loads += [x[0] for x in [loadavg()] if x]
    system.precomputed = bool(cfg.model.precomputed)
    out: Dict[str, Any] = {"batch_size": bs, "block": block, "pairs_per_round": pairs, "rounds": rounds,
                           "load_1min_max": max(loads) if loads else None, "what": {
        "framework": "Trainer.fit of TextToImageSystem on a fixed in-memory batch: loop, precision "
                     "plugin, training_step with self.log, AdamW + clipping + LR scheduler, EMA callback",
        "plain": "hand-written loop: same modules, batch copy, encoders/arrays, U-Net, loss, backward, "
                 "clipping, AdamW, LR scheduler, EMA; run between the framework's steps",
    }}
    cpus = os.cpu_count()
    for mode in raw:
        a, b = raw[mode]["a"], raw[mode]["b"]
        fw, pl = train_row(a, bs), train_row(b, bs)
        fw["spread"], pl["spread"] = summary(a["wall"]), summary(b["wall"])
        ratios = grouped_ratios(a["wall"], a["pair"], b["wall"], b["pair"])
        by_round = grouped_ratios(a["wall"], [p // pairs for p in a["pair"]],
                                  b["wall"], [p // pairs for p in b["pair"]])
        cpu_ratios = grouped_ratios(a["cpu"], a["pair"], b["cpu"], b["pair"])
        ratio = summary(ratios)
        out[mode] = {"framework": fw, "plain": pl, "overhead": ratio["median"],
                     "overhead_cpu": summary(cpu_ratios)["median"],
                     "ratio": {**ratio, "pairs": [round(x, 4) for x in ratios],
                               "by_round": [round(x, 4) for x in by_round]},
                     "verdict": judge(ratios, per_round=pairs, rounds=rounds, load=out["load_1min_max"],
                                      cpus=cpus)}
    on, pre_ = out["online"]["framework"], out["precomputed"]["framework"]
    out["precomputed_speedup"] = on["step_s"] / pre_["step_s"]
    out["precomputed_speedup_cpu"] = on["step_cpu_s"] / pre_["step_cpu_s"]
    # online and precomputed run in separate fits, adjacent in each round: their ratio per round
    a_on, a_pre = raw["online"]["a"], raw["precomputed"]["a"]
    out["precomputed_speedup_by_round"] = [round(x, 4) for x in grouped_ratios(
        a_on["wall"], [p // pairs for p in a_on["pair"]], a_pre["wall"], [p // pairs for p in a_pre["pair"]])]
    out["memory"] = memory
    return out
