"""The training-step runners — ``Trainer.fit`` of the real system (a) and a hand-written loop (b)
over the same modules — and the ``train`` section that interleaves them."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig

from mmdiff.callbacks.ema import EMACallback
from mmdiff.jobs.bench.batches import RepeatBatch, make_batch, pinned, precision_context, precomputed_batch, use_stored_arrays
from mmdiff.jobs.bench.timing import Times, intervals, stamp, sync, train_row
from mmdiff.models.vae import encode_finite
from mmdiff.systems.optim import configure_adamw, fused_adamw_setting

log = logging.getLogger(__name__)


class _StepTimer(L.Callback):
    """Timestamps after each optimiser step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: List[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.stamps.append(stamp())


def framework_steps(system: Any, cfg: DictConfig, batch: Optional[Dict[str, Any]], steps: int,
                    warmup: int, device: torch.device, datamodule: Any = None) -> Times:
    """Step times of ``Trainer.fit`` on ``system``: over a fixed in-memory ``batch`` (see the
    module docstring), or with a real ``datamodule`` (its loader workers run alongside)."""
    timer = _StepTimer(device)
    callbacks: List[Any] = [timer]
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
        loader = torch.utils.data.DataLoader(RepeatBatch(pinned(batch, device), n), batch_size=None)
        trainer.fit(system, train_dataloaders=loader)
    system.to(device)  # Lightning's teardown moves a GPU model back to the CPU
    return intervals(timer.stamps, warmup)


def plain_steps(system: Any, cfg: DictConfig, batch: Dict[str, Any], steps: int, warmup: int,
                device: torch.device, precomputed: bool) -> Times:
    """Step times of a minimal hand-written loop over the same modules, batch and precision."""
    unet, vae, clip = system.unet, system.vae, system.clip
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimiser = configure_adamw(params, cfg.optim, cfg.trainer.max_steps, fused=fused_adamw_setting(cfg.trainer))
    opt, sched = optimiser["optimizer"], optimiser["lr_scheduler"]["scheduler"]
    ema = [p.detach().float().clone() for p in params] if cfg.model.use_ema else None
    alpha_bar = system.diffusion.schedule.alphas_cumprod.to(device=device, dtype=torch.float32)
    num_t = alpha_bar.shape[0]
    scale = float(system.latent_scale) or 1.0
    clip_val = cfg.trainer.gradient_clip_val
    precision = str(cfg.trainer.precision)
    scaler = torch.amp.GradScaler(device.type) if precision.startswith("16") else None
    channels_last = bool(system.speed.get("channels_last"))
    use_pooled = bool(cfg.model.unet.use_pooled_text)
    source = pinned(batch, device)
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
        with precision_context(precision, device):
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
        sync(device)
        stamps.append(stamp())
    return intervals(stamps, warmup)


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
        fw, pl = train_row(times[mode]["framework"], bs), train_row(times[mode]["plain"], bs)
        out[mode] = {"framework": fw, "plain": pl, "overhead": fw["step_s"] / pl["step_s"],
                     "overhead_cpu": fw["step_cpu_s"] / pl["step_cpu_s"]}
    on, pre_ = out["online"]["framework"], out["precomputed"]["framework"]
    out["precomputed_speedup"] = on["step_s"] / pre_["step_s"]
    out["precomputed_speedup_cpu"] = on["step_cpu_s"] / pre_["step_cpu_s"]
    out["memory"] = memory
    return out
