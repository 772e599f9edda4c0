"""``mmdiff bench CONFIG``: where the time of a text-to-image config goes, in one run.

:func:`run_bench` measures, on this machine, for the config's model, batch and precision
(docs/performance.md explains how to read the table):

* **train** — median step time and images/s after warm-up, two ways side by side in one process
  on the same U-Net, optimiser, batch and precision, interleaved over ``rounds``:

  - ``framework`` (a): ``lightning.Trainer.fit`` of the real :class:`TextToImageSystem`: Lightning's
    loop and precision plugin, automatic optimisation (zero_grad, backward, gradient clipping, AdamW,
    LR scheduler), the system's ``training_step`` (caption dropout, frozen encoders or stored
    arrays, the diffusion loss, ``self.log``) and the EMA callback (when ``model.use_ema``).
    Batches come from an in-memory loader of one fixed batch (the real loader is measured on its
    own below); no logger, checkpoints, previews or validation. A step is the interval between
    consecutive ``on_train_batch_end`` calls, so everything between two steps counts.
  - ``plain`` (b): a minimal hand-written PyTorch loop doing the same work: batch to device,
    VAE + text encoder under ``no_grad`` (or the stored arrays), noise, U-Net, ε-MSE, backward,
    clipping, AdamW, LR schedule, EMA lerp.

  ``overhead`` = (a)/(b). Each runs with **online** encoding (VAE + text encoder every step) and
  from **precomputed** latents and text states (``model.precomputed``); ``precomputed_speedup``
  is online/precomputed step time of (a).
* **loader** — the config's ``ShardDataModule`` alone: images/s decoded and augmented with no
  workers (one process: the per-worker rate) and with ``data.num_workers``, against the images/s
  the framework step consumes (``headroom``).
* **flops** — ``torch.utils.flop_counter`` FLOPs per image of the U-Net's training step
  (forward + backward), of one U-Net call and of the frozen encoders; achieved FLOP/s, and on a
  GPU MFU against the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`).
* **memory** — peak CPU RSS, and per section ``torch.cuda.max_memory_allocated`` on a GPU.
* **sampling** — ms per U-Net call and s/image of a 20-step ``dpmpp_2m`` run with the config's
  guidance scale (both branches in one U-Net call) at batch 1 and 16, VAE decode included.

Timings on a shared machine are noisy: the load average before and after is in the result.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from mmdiff.devices import resolve_device
from mmdiff.errors import ConfigError, MmdiffError

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order against the device name.
PEAK_BF16_TFLOPS: List[tuple[str, float]] = [
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]

# Overrides for timing a real-scale config without its weight files (timings do not depend on
# weight values): `mmdiff bench configs/sd/sd_256.yaml --preset random-weights-sd`.
PRESETS: Dict[str, List[str]] = {
    "random-weights-sd": [
        "model.vae.pretrained=null",
        "model.vae.block_out_channels=[128,256,512,512]",
        "model.vae.layers_per_block=2",
        "model.vae.norm_num_groups=32",
        "model.vae.latent_channels=4",
        "model.clip.pretrained=null",
        "model.unet.pretrained=null",
    ],
}


SECTIONS = ("train", "fit", "loader", "flops", "sampling")


# ------------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _precision_context(precision: str, device: torch.device):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def peak_bf16_tflops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak (TFLOP/s) from :data:`PEAK_BF16_TFLOPS`; None on CPU/unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def _flop_mapping() -> Dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention kernels, which torch's counter leaves out."""
    from torch.utils import flop_counter as fc

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping: Dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of ``fn()`` (matmuls, convolutions and attention) by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def pick_bench_device(cfg: DictConfig, device: str = "auto") -> torch.device:
    """``--device``, or for ``auto`` the GPU when the config's accelerator allows one and there is one."""
    wants_gpu = str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda")
    return resolve_device(device, allow_gpu=wants_gpu)


# ------------------------------------------------------------------------------ the batches
def make_batch(cfg: DictConfig, batch_size: int, seed: int = 0) -> Dict[str, Any]:
    """A fixed image/caption batch of the config's size (content does not change timings)."""
    g = torch.Generator().manual_seed(seed)
    size = int(cfg.data.image_size)
    images = (torch.randn(batch_size, 3, size, size, generator=g) * 0.5).clamp(-1, 1)
    prompts = list(cfg.sampling.prompts) or ["a photo of something"]
    captions = [prompts[i % len(prompts)] for i in range(batch_size)]
    return {"image": images, "caption": captions}


@torch.no_grad()
def precomputed_batch(system: Any, batch: Dict[str, Any]) -> Dict[str, Any]:
    """What `mmdiff precompute` would store for ``batch``: latent mean/logvar, context, pooled."""
    posterior = system.encode_posterior(batch["image"])
    cond = system.encode_prompts(batch["caption"])
    return {
        "latent": posterior.mean.float().cpu().half(),
        "latent_logvar": posterior.logvar.float().cpu().half(),
        "context": cond["context"].cpu().half(),
        "pooled": cond["pooled"].cpu().half(),
        "caption": list(batch["caption"]),
    }


def use_stored_arrays(system: Any) -> None:
    """Let ``system`` train on in-memory precomputed batches: no shards are read, so skip the
    precompute-folder check and use the text encoder's own empty-prompt states."""
    system._check_precomputed = lambda: None
    system._empty_states = system.encode_prompts([""])


class _RepeatBatch(torch.utils.data.IterableDataset):
    """The same batch, ``n`` times."""

    def __init__(self, batch: Dict[str, Any], n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for _ in range(self.n):
            yield self.batch

    def __len__(self) -> int:
        return self.n


def _pinned(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- the two loops
class _StepTimer:
    """Timestamps after each optimiser step (Lightning callback)."""

    def __init__(self, device: torch.device) -> None:
        import lightning as L

        device_ = device

        class Timer(L.Callback):
            def __init__(self) -> None:
                self.stamps: List[tuple[float, float]] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                _sync(device_)
                self.stamps.append(_stamp())

        self.callback = Timer()

    @property
    def stamps(self) -> List[tuple[float, float]]:
        return self.callback.stamps


def _stamp() -> tuple[float, float]:
    """(wall clock, CPU time of this process: all its threads, not the loader workers)."""
    return time.perf_counter(), time.process_time()


Times = Dict[str, List[float]]


def _intervals(stamps: List[tuple[float, float]], warmup: int) -> Times:
    """Wall and CPU step times from the stamps after each of ``warmup + steps`` steps: the last
    ``steps`` (step 1 has no start stamp, so at least one warm-up step is always made)."""
    skip = max(1, warmup) - 1
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][skip:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][skip:]
    return {"wall": wall, "cpu": cpu}


def framework_steps(system: Any, cfg: DictConfig, batch: Optional[Dict[str, Any]], steps: int,
                    warmup: int, device: torch.device, datamodule: Any = None) -> Times:
    """Step times of ``Trainer.fit`` on ``system``: over a fixed in-memory ``batch`` (see the
    module docstring), or with a real ``datamodule`` (its loader workers run alongside)."""
    import lightning as L

    from mmdiff.callbacks.ema import EMACallback

    timer = _StepTimer(device)
    callbacks: List[Any] = [timer.callback]
    if cfg.model.use_ema:
        callbacks.insert(0, EMACallback(decay=cfg.model.ema_decay))
    n = max(1, warmup) + steps
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
        loader = torch.utils.data.DataLoader(_RepeatBatch(_pinned(batch, device), n), batch_size=None)
        trainer.fit(system, train_dataloaders=loader)
    system.to(device)  # Lightning's teardown moves a GPU model back to the CPU
    return _intervals(timer.stamps, warmup)


def plain_steps(system: Any, cfg: DictConfig, batch: Dict[str, Any], steps: int, warmup: int,
                device: torch.device, precomputed: bool) -> Times:
    """Step times of a minimal hand-written loop over the same modules, batch and precision."""
    from mmdiff.models.vae import encode_finite
    from mmdiff.systems.common import fused_adamw_setting, lr_lambda, use_fused_adamw

    unet, vae, clip = system.unet, system.vae, system.clip
    unet.train()
    o = cfg.optim
    params = [p for p in unet.parameters() if p.requires_grad]
    extra = {"fused": True} if use_fused_adamw(params, fused_adamw_setting(cfg.trainer)) else {}
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, **extra)
    schedule = str(getattr(o.schedule, "value", o.schedule))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, o.warmup_steps, cfg.trainer.max_steps, schedule, o.min_lr_ratio))
    ema = [p.detach().float().clone() for p in params] if cfg.model.use_ema else None
    alpha_bar = system.diffusion.schedule.alphas_cumprod.to(device=device, dtype=torch.float32)
    num_t = alpha_bar.shape[0]
    scale = float(system.latent_scale) or 1.0
    clip_val = cfg.trainer.gradient_clip_val
    precision = str(cfg.trainer.precision)
    scaler = torch.amp.GradScaler(device.type) if precision.startswith("16") else None
    channels_last = bool(system.speed.get("channels_last"))
    use_pooled = bool(cfg.model.unet.use_pooled_text)
    source = _pinned(batch, device)
    stamps: List[tuple[float, float]] = []
    for step in range(max(1, warmup) + steps):
        b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
             for k, v in source.items()}
        with torch.no_grad():
            if precomputed:
                mean = b["latent"].float()
                x0 = (mean + torch.exp(0.5 * b["latent_logvar"].float()) * torch.randn_like(mean)) * scale
                context, pooled = b["context"].float(), b["pooled"].float()
            else:
                x0 = encode_finite(vae, b["image"]).sample().float() * scale
                context, pooled = clip.encode_text(clip.tokenize(b["caption"]).to(device))
        t = torch.randint(0, num_t, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with _precision_context(precision, device):
            pred = unet(x_t, t, encoder_hidden_states=context,
                        class_labels=pooled if use_pooled else None).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if clip_val:
            torch.nn.utils.clip_grad_norm_(params, clip_val)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        if ema is not None:
            decay = min(cfg.model.ema_decay, (2 + step) / (11 + step))
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1.0 - decay)
        _sync(device)
        stamps.append(_stamp())
    return _intervals(stamps, warmup)


def _train_row(times: Times, batch_size: int) -> Dict[str, Any]:
    wall, cpu = times["wall"], times["cpu"]
    med = _median(wall)
    return {"step_s": med, "images_per_s": batch_size / med if med > 0 else float("nan"),
            "step_s_min": min(wall) if wall else float("nan"), "steps": len(wall),
            "step_cpu_s": _median(cpu), "step_s_all": [round(x, 6) for x in wall],
            "step_cpu_s_all": [round(x, 6) for x in cpu]}


# ------------------------------------------------------------------------------- sections
def bench_train(system: Any, cfg: DictConfig, device: torch.device, *, steps: int, warmup: int,
                rounds: int) -> Dict[str, Any]:
    """Framework vs plain loop, online vs precomputed (see the module docstring)."""
    bs = int(cfg.data.batch_size)
    online = make_batch(cfg, bs)
    system.precomputed = False
    pre = precomputed_batch(system, {"image": online["image"].to(device), "caption": online["caption"]})
    use_stored_arrays(system)
    times: Dict[str, Dict[str, Times]] = {m: {k: {"wall": [], "cpu": []} for k in ("framework", "plain")}
                                          for m in ("online", "precomputed")}
    memory: Dict[str, float] = {}
    for r in range(rounds):
        for mode, batch in (("online", online), ("precomputed", pre)):
            system.precomputed = mode == "precomputed"
            for kind in ("plain", "framework") if r % 2 == 0 else ("framework", "plain"):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                log.info("bench: train %s %s, round %d/%d", mode, kind, r + 1, rounds)
                if kind == "framework":
                    got = framework_steps(system, cfg, batch, steps, warmup, device)
                else:
                    got = plain_steps(system, cfg, batch, steps, warmup, device, mode == "precomputed")
                for key in ("wall", "cpu"):
                    times[mode][kind][key] += got[key]
                if device.type == "cuda":
                    key = f"train_{mode}_{kind}_cuda_max_allocated_mb"
                    memory[key] = max(memory.get(key, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    system.precomputed = bool(cfg.model.precomputed)
    out: Dict[str, Any] = {"batch_size": bs, "what": {
        "framework": "Trainer.fit of TextToImageSystem on a fixed in-memory batch: loop, precision "
                     "plugin, training_step with self.log, AdamW + clipping + LR scheduler, EMA callback",
        "plain": "hand-written loop: same modules, batch copy, encoders/arrays, U-Net, loss, backward, "
                 "clipping, AdamW, LR scheduler, EMA",
    }}
    for mode in times:
        fw, pl = _train_row(times[mode]["framework"], bs), _train_row(times[mode]["plain"], bs)
        out[mode] = {"framework": fw, "plain": pl, "overhead": fw["step_s"] / pl["step_s"],
                     "overhead_cpu": fw["step_cpu_s"] / pl["step_cpu_s"]}
    on, pre_ = out["online"]["framework"], out["precomputed"]["framework"]
    out["precomputed_speedup"] = on["step_s"] / pre_["step_s"]
    out["precomputed_speedup_cpu"] = on["step_cpu_s"] / pre_["step_cpu_s"]
    out["memory"] = memory
    return out


def _loader_rows(data_cfg: DictConfig, workers_list: Sequence[int], seed: int, *, batches: int,
                 warmup: int) -> Dict[str, Any]:
    from mmdiff.data.datamodule import ShardDataModule

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


def precomputed_data(data_cfg: DictConfig, folder: str | Path) -> DictConfig:
    """``data:`` reading an ``mmdiff precompute`` folder instead of the image shards."""
    from mmdiff.precompute import read_metadata

    folder = Path(folder).expanduser().resolve()
    meta = read_metadata(folder)
    return OmegaConf.merge(data_cfg, {  # type: ignore[return-value]
        "train_shards": [str(folder / "train-*.tar")], "val_shards": [], "load_images": False,
        "caption_key": "txt", "array_keys": list(meta["array_keys"])})


def bench_loader(cfg: DictConfig, *, batches: int, warmup: int,
                 precomputed_dir: Optional[str] = None) -> Dict[str, Any]:
    """Images/s of the config's ShardDataModule alone, without workers and with data.num_workers
    (and of the same loader over an ``mmdiff precompute`` folder, when given)."""
    workers = sorted({0, int(cfg.data.num_workers)})
    rows = _loader_rows(cfg.data, workers, cfg.seed, batches=batches, warmup=warmup)
    out = {"by_workers": rows, "per_worker_images_per_s": rows["0"]["images_per_s"],
           "what": "ShardDataModule.train_dataloader(): read, shuffle, decode, resize/crop, collate"}
    if precomputed_dir:
        out["precomputed_by_workers"] = _loader_rows(precomputed_data(cfg.data, precomputed_dir), workers,
                                                     cfg.seed, batches=batches, warmup=warmup)
    return out


def bench_flops(system: Any, cfg: DictConfig, device: torch.device) -> Dict[str, Any]:
    """FLOPs per image: U-Net training step (fwd + bwd), one U-Net call, frozen encoders."""
    bs = min(int(cfg.data.batch_size), 8)
    batch = make_batch(cfg, bs)
    system.precomputed = False
    images = batch["image"].to(device)
    latents = system.encode_images(images, sample=False)
    cond = system.encode_prompts(batch["caption"])
    t = torch.randint(0, system.diffusion.num_timesteps, (bs,), device=device)
    system.unet.train()

    def train_step() -> None:
        with _precision_context(str(cfg.trainer.precision), device):
            out = system.denoise(latents, t, cond)
        out.float().square().mean().backward()

    def forward() -> None:
        with torch.no_grad():
            system.denoise(latents[:1], t[:1], {k: v[:1] for k, v in cond.items()})

    train = count_flops(train_step) / bs
    system.unet.zero_grad(set_to_none=True)
    call = count_flops(forward)
    vae = count_flops(lambda: system.encode_images(images)) / bs
    text = count_flops(lambda: system.encode_prompts(batch["caption"])) / bs
    system.precomputed = bool(cfg.model.precomputed)
    return {"unet_train_per_image": train, "unet_forward_per_image": call,
            "vae_encode_per_image": vae, "text_encode_per_image": text,
            "online_train_per_image": train + vae + text}


def bench_fit(system: Any, cfg: DictConfig, device: torch.device, *, steps: int, warmup: int,
              precomputed_dir: Optional[str] = None) -> Dict[str, Any]:
    """``Trainer.fit`` with the real ShardDataModule (``data.num_workers`` workers running alongside
    the step, as in ``mmdiff fit``): the config's image shards with online encoding, and the
    shards of ``precomputed_dir`` (an ``mmdiff precompute`` folder of this config) when given."""
    from mmdiff.data.datamodule import ShardDataModule
    from mmdiff.precompute import check_against

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
        out[mode] = _train_row(times, bs)
    system.precomputed = bool(cfg.model.precomputed)
    if "precomputed" in out:
        out["precomputed_speedup"] = out["online"]["step_s"] / out["precomputed"]["step_s"]
        out["precomputed_speedup_cpu"] = out["online"]["step_cpu_s"] / out["precomputed"]["step_cpu_s"]
    return out


class _CallTimer:
    """Times each forward call of a module (synchronising on CUDA)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.times: List[float] = []
        self._start = 0.0
        self._device = device

        def pre(mod, args, kwargs=None):
            _sync(self._device)
            self._start = time.perf_counter()

        def post(mod, args, output):
            _sync(self._device)
            self.times.append(time.perf_counter() - self._start)

        self._handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def bench_sampling(system: Any, cfg: DictConfig, device: torch.device, *,
                   batch_sizes: Sequence[int] = (1, 16), steps: int = 20,
                   sampler: str = "dpmpp_2m") -> Dict[str, Any]:
    """s/image and ms per U-Net call of ``system.sample`` (guidance from the config)."""
    system.eval()
    prompts = list(cfg.sampling.prompts) or ["a photo of something"]
    rows: Dict[str, Any] = {}
    for bs in batch_sizes:
        batch_prompts = [prompts[i % len(prompts)] for i in range(bs)]
        system.sample(batch_prompts, seed=0, sampler=sampler, steps=2)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = _CallTimer(system.unet, device)
        try:
            _sync(device)
            start = time.perf_counter()
            system.sample(batch_prompts, seed=0, sampler=sampler, steps=steps)
            _sync(device)
            total = time.perf_counter() - start
        finally:
            timer.close()
        row = {"batch_size": bs, "s_total": total, "s_per_image": total / bs,
               "unet_calls": len(timer.times), "ms_per_unet_call": 1000 * _median(timer.times),
               "unet_share": sum(timer.times) / total}
        if device.type == "cuda":
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows[str(bs)] = row
    guidance = float(cfg.sampling.guidance_scale)
    return {"sampler": sampler, "steps": steps, "guidance_scale": guidance,
            "unet_batch": "2 × batch (guided and unguided in one call)" if guidance != 1.0 else "batch",
            "by_batch": rows}


# ----------------------------------------------------------------------------------- driver
def environment(device: torch.device) -> Dict[str, Any]:
    import diffusers
    import lightning

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "lightning": lightning.__version__, "diffusers": diffusers.__version__,
           "device": str(device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def run_bench(
    cfg: DictConfig,
    *,
    steps: int = 20,
    warmup: int = 5,
    rounds: int = 2,
    sections: Sequence[str] = ("train", "fit", "loader", "flops", "sampling"),
    loader_batches: int = 20,
    sample_batch_sizes: Sequence[int] = (1, 16),
    sample_steps: int = 20,
    device: str = "auto",
    peak_tflops: Optional[float] = None,
    threads: Optional[int] = None,
    precomputed_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Run the benchmark sections for a text-to-image config; return the results as plain data.

    ``threads`` sets ``torch.set_num_threads`` for the run (then restores it): on a CPU shared
    with other jobs, fewer threads than cores gives steadier figures.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run(cfg, steps=steps, warmup=warmup, rounds=rounds, sections=sections,
                    loader_batches=loader_batches, sample_batch_sizes=sample_batch_sizes,
                    sample_steps=sample_steps, device=device, peak_tflops=peak_tflops,
                    precomputed_dir=precomputed_dir)
    finally:
        torch.set_num_threads(before)


def _run(cfg: DictConfig, *, steps: int, warmup: int, rounds: int, sections: Sequence[str],
         loader_batches: int, sample_batch_sizes: Sequence[int], sample_steps: int, device: str,
         peak_tflops: Optional[float], precomputed_dir: Optional[str]) -> Dict[str, Any]:
    import lightning as L

    from mmdiff.systems.text_to_image import TextToImageSystem

    if cfg.system != "text_to_image":
        raise ConfigError(f"mmdiff bench measures text_to_image configs, not '{cfg.system}'.")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown bench section(s) {unknown}; choose from {', '.join(SECTIONS)}.")
    cfg = copy.deepcopy(cfg)
    cfg.model.precomputed = False
    dev = pick_bench_device(cfg, device)
    result: Dict[str, Any] = {"load_average_start": _loadavg(), "environment": environment(dev),
                              "config": {"name": cfg.name, "batch_size": int(cfg.data.batch_size),
                                         "image_size": int(cfg.data.image_size),
                                         "precision": str(cfg.trainer.precision)}}
    started = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)
    system = TextToImageSystem(cfg)
    if float(system.latent_scale) == 0.0:
        system.latent_scale.fill_(1.0)  # estimated from data in real runs; irrelevant to timings
    system.to(dev)
    from mmdiff.systems.common import enable_tf32, prepare_unet

    if dev.type == "cuda":
        enable_tf32(bool(cfg.trainer.tf32))
    system.speed = prepare_unet(system.unet, cfg.model.unet, dev)
    result["config"].update({
        "latent_shape": [system.latent_channels, system.latent_size, system.latent_size],
        "unet_params": sum(p.numel() for p in system.unet.parameters()),
        "vae_params": sum(p.numel() for p in system.vae.parameters()),
        "text_encoder_params": sum(p.numel() for p in system.clip.parameters()),
        "speed_switches": dict(system.speed),
        "fused_adamw": cfg.trainer.fused_adamw,
        "attention_processors": dict(Counter(type(p).__name__ for p in system.unet.attn_processors.values())),
    })
    if "flops" in sections:
        log.info("bench: counting FLOPs")
        result["flops"] = bench_flops(system, cfg, dev)
    if "train" in sections:
        result["train"] = bench_train(system, cfg, dev, steps=steps, warmup=warmup, rounds=rounds)
    if "fit" in sections:
        try:
            result["fit"] = bench_fit(system, cfg, dev, steps=steps, warmup=warmup,
                                      precomputed_dir=precomputed_dir)
        except MmdiffError as err:  # e.g. shards this machine cannot read
            log.warning("bench: fit with the data module skipped: %s", err)
            result["fit"] = {"error": str(err)}
    if "loader" in sections:
        log.info("bench: data loader")
        try:
            result["loader"] = bench_loader(cfg, batches=loader_batches, warmup=2,
                                            precomputed_dir=precomputed_dir)
        except MmdiffError as err:  # e.g. shards behind `pipe:` commands this machine cannot run
            log.warning("bench: data loader skipped: %s", err)
            result["loader"] = {"error": str(err)}
        if "train" in result and "error" not in result["loader"]:
            for mode in ("online", "precomputed"):
                consumed = result["train"][mode]["framework"]["images_per_s"]
                result["loader"][f"consumed_{mode}_images_per_s"] = consumed
            rows = result["loader"]["by_workers"]
            delivered = rows[str(int(cfg.data.num_workers))]["images_per_s"]
            result["loader"]["headroom_online"] = delivered / result["loader"]["consumed_online_images_per_s"]
    if "sampling" in sections:
        log.info("bench: sampling")
        result["sampling"] = bench_sampling(system, cfg, dev, batch_sizes=sample_batch_sizes,
                                            steps=sample_steps)
    if "flops" in result and "train" in result:
        f, tr = result["flops"], result["train"]
        peak = peak_tflops if peak_tflops is not None else peak_bf16_tflops(dev)
        achieved = {
            "online": f["online_train_per_image"] * tr["online"]["framework"]["images_per_s"],
            "precomputed": f["unet_train_per_image"] * tr["precomputed"]["framework"]["images_per_s"],
        }
        f["achieved_tflops"] = {k: v / 1e12 for k, v in achieved.items()}
        f["peak_bf16_tflops"] = peak
        f["mfu"] = {k: v / (peak * 1e12) for k, v in achieved.items()} if peak else None
    result["memory"] = {"cpu_peak_rss_mb": _rss_mb()}
    if dev.type == "cuda":
        result["memory"].update(result.get("train", {}).get("memory", {}))
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - started
    result["load_average_end"] = _loadavg()
    return result


def targets(result: Dict[str, Any]) -> Dict[str, Any]:
    """The acceptance figures (docs/performance.md) and whether this run met them."""
    out: Dict[str, Any] = {}
    tr = result.get("train")
    on_cpu = str(result.get("environment", {}).get("device", "")).startswith("cpu")
    if tr:
        out["overhead_online<=1.10"] = tr["online"]["overhead"] <= 1.10
        out["overhead_precomputed<=1.10"] = tr["precomputed"]["overhead"] <= 1.10
        out["precomputed_speedup>=1.3"] = tr["precomputed_speedup"] >= 1.3
        if on_cpu:  # CPU time: what a shared CPU's load does not distort
            out["overhead_online_cpu_time<=1.10"] = tr["online"]["overhead_cpu"] <= 1.10
            out["overhead_precomputed_cpu_time<=1.10"] = tr["precomputed"]["overhead_cpu"] <= 1.10
            out["precomputed_speedup_cpu_time>=1.3"] = tr["precomputed_speedup_cpu"] >= 1.3
    ld = result.get("loader")
    if ld and "headroom_online" in ld:
        out["loader_headroom>=3"] = ld["headroom_online"] >= 3.0
    ft = result.get("fit")
    if ft and "precomputed_speedup" in ft:
        out["fit_precomputed_speedup>=1.3"] = ft["precomputed_speedup"] >= 1.3
    return out


# ------------------------------------------------------------------------------------ output
def _si(x: Optional[float], unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def format_table(result: Dict[str, Any]) -> str:
    """The result as a plain-text table."""
    env, c = result["environment"], result["config"]
    lines = [
        f"mmdiff bench: {c['name']} on {env.get('device_name', env['device'])} "
        f"(torch {env['torch']}, {env['threads']} threads), batch {c['batch_size']}, "
        f"{c['image_size']} px → latents {c.get('latent_shape')}, precision {c['precision']}",
        f"load average: start {result.get('load_average_start')}, end {result.get('load_average_end')}",
        f"U-Net {c.get('unet_params', 0) / 1e6:.2f} M params, attention {c.get('attention_processors')}, "
        f"switches {c.get('speed_switches')}",
    ]
    tr = result.get("train")
    if tr:
        lines += ["", f"{'training step':<28}{'step ms':>10}{'img/s':>10}{'(a)/(b)':>10}"
                      f"{'CPU ms':>10}{'(a)/(b)':>10}"]
        for mode in ("online", "precomputed"):
            row = tr[mode]
            for kind, label in (("framework", "(a) framework"), ("plain", "(b) plain loop")):
                r = row[kind]
                ratio = f"{row['overhead']:.3f}" if kind == "framework" else ""
                ratio_cpu = f"{row['overhead_cpu']:.3f}" if kind == "framework" else ""
                lines.append(f"{mode + ' ' + label:<28}{1000 * r['step_s']:>10.1f}{r['images_per_s']:>10.1f}"
                             f"{ratio:>10}{1000 * r['step_cpu_s']:>10.1f}{ratio_cpu:>10}")
        lines.append(f"precomputed speed-up (a): {tr['precomputed_speedup']:.2f}× wall clock, "
                     f"{tr['precomputed_speedup_cpu']:.2f}× CPU time")
    ft = result.get("fit")
    if ft and "error" in ft:
        lines += ["", f"fit with the data module: skipped ({ft['error']})"]
    elif ft:
        lines += ["", f"fit with the data module ({ft['num_workers']} workers alongside):"]
        for mode in ("online", "precomputed"):
            if mode in ft:
                r = ft[mode]
                lines.append(f"  {mode:<26}{1000 * r['step_s']:>10.1f}{r['images_per_s']:>10.1f}"
                             f"{'':>10}{1000 * r['step_cpu_s']:>10.1f}")
        if "precomputed_speedup" in ft:
            lines.append(f"  precomputed speed-up: {ft['precomputed_speedup']:.2f}× wall clock, "
                         f"{ft['precomputed_speedup_cpu']:.2f}× CPU time of the training process")
    ld = result.get("loader")
    if ld and "error" in ld:
        lines += ["", f"data loader: skipped ({ld['error']})"]
    elif ld:
        lines += ["", "data loader alone:"]
        for r in ld["by_workers"].values():
            lines.append(f"  {r['workers']} worker(s): {r['images_per_s']:.0f} img/s")
        for r in ld.get("precomputed_by_workers", {}).values():
            lines.append(f"  {r['workers']} worker(s), precomputed shards: {r['images_per_s']:.0f} img/s")
        if "consumed_online_images_per_s" in ld:
            lines.append(f"  training consumes {ld['consumed_online_images_per_s']:.0f} img/s online, "
                         f"{ld['consumed_precomputed_images_per_s']:.0f} img/s precomputed; "
                         f"headroom {ld['headroom_online']:.1f}× (online)")
    f = result.get("flops")
    if f:
        lines += ["", "FLOPs per image: U-Net train step " + _si(f["unet_train_per_image"], "FLOP")
                  + ", U-Net call " + _si(f["unet_forward_per_image"], "FLOP")
                  + ", VAE encode " + _si(f["vae_encode_per_image"], "FLOP")
                  + ", text encode " + _si(f["text_encode_per_image"], "FLOP")]
        if "achieved_tflops" in f:
            a = f["achieved_tflops"]
            mfu = f.get("mfu")
            lines.append(f"achieved: {a['online'] * 1e3:.1f} GFLOP/s online, {a['precomputed'] * 1e3:.1f} "
                         f"GFLOP/s precomputed" + (f"; MFU {100 * mfu['online']:.1f}% / "
                                                    f"{100 * mfu['precomputed']:.1f}% of "
                                                    f"{f['peak_bf16_tflops']:.0f} TFLOP/s bf16" if mfu else
                                                    " (MFU: no bf16 peak known for this device)"))
    s = result.get("sampling")
    if s:
        lines += ["", f"sampling: {s['sampler']}, {s['steps']} steps, guidance {s['guidance_scale']} "
                      f"(U-Net batch = {s['unet_batch']})"]
        for r in s["by_batch"].values():
            lines.append(f"  batch {r['batch_size']:>3}: {r['s_per_image']:.3f} s/image, "
                         f"{r['ms_per_unet_call']:.1f} ms per U-Net call ({r['unet_calls']} calls, "
                         f"{100 * r['unet_share']:.0f}% of the time in the U-Net)")
    m = result.get("memory", {})
    lines += ["", "memory: peak CPU RSS " + f"{m.get('cpu_peak_rss_mb', 0):.0f} MiB"
              + "".join(f", {k} {v:.0f} MiB" for k, v in m.items() if k != "cpu_peak_rss_mb")]
    if result.get("targets"):
        lines.append("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return "\n".join(lines)


def write_json(result: Dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path


__all__ = ["run_bench", "format_table", "write_json", "PEAK_BF16_TFLOPS", "PRESETS", "count_flops"]
