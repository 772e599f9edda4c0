"""The GPU check's sections: each builds its configs and systems and returns its figures
(``run_section``); the time budgets and the batch finder they share.

Each section imports what it needs inside its function: a section runs in a subprocess of its own
and loads only its own libraries, and the runner, which imports this module for the table of
sections, refuses a machine without a GPU before torch is ever imported."""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]  # the checkout: configs/ and the package

#: Section name → time budget on a GPU (seconds, start-up of the subprocess included).
SECTIONS: Dict[str, int] = {
    "demo": 60,
    "sd_unet_eager": 110,
    "sd_unet_regional": 140,
    "sampling": 50,
    "fsdp": 40,
    "fp16_scaler": 35,
    "fp16_vae": 35,
    "resume": 60,
}
#: The whole script's hard deadline on a GPU (seconds).
DEADLINE_S = 540
#: Dense bf16 peak (TFLOP/s) used for MFU when the device name is not in ``bench.PEAK_BF16_TFLOPS``.
DEFAULT_PEAK_TFLOPS = 989.0
NO_GPU = "needs a CUDA GPU; use --dry-run to check the script on CPU"

SD_PARAMS_M = 865.9


# ------------------------------------------------------------------------------------ configs
def _random_weights(dry_run: bool) -> List[str]:
    """Overrides for the demo config without its weight files (timings do not depend on weights)."""
    common = ["model.vae.pretrained=null", "model.clip.pretrained=null"]
    if dry_run:
        return common + ["model.vae.block_out_channels=[32,32]", "model.unet.block_out_channels=[32,32]",
                         "model.unet.attention_head_dim=8", "data.image_size=16", "data.batch_size=4",
                         "trainer.accelerator=cpu", "model.vae.scale_estimate_batches=1"]
    return common + ["trainer.accelerator=gpu", "trainer.devices=1", "model.vae.scale_estimate_batches=1"]


def demo_config(dry_run: bool, extra: Sequence[str] = ()) -> Any:
    from mmdiff.config import load_config

    return load_config(REPO / "configs/demo/text_to_image.yaml", [*_random_weights(dry_run), *extra])


def sd_config(dry_run: bool, compile_mode: str = "none") -> Any:
    """The SD-2-size 256² config with random weights (a toy U-Net of the same layout on a dry run)."""
    from mmdiff.jobs.bench import PRESETS
    from mmdiff.config import load_config

    extra = ["trainer.precision=bf16-mixed", "model.unet.channels_last=true", f"model.unet.compile={compile_mode}"]
    if dry_run:
        extra += ["trainer.accelerator=cpu", "model.unet.block_out_channels=[32,32,32,32]",
                  "model.unet.attention_head_dim=8", "model.unet.norm_num_groups=8",
                  "model.unet.layers_per_block=1", "model.clip.name=custom", "data.image_size=32",
                  "data.batch_size=2"]
        preset = ["model.vae.pretrained=null", "model.vae.block_out_channels=[32,32]",
                  "model.vae.norm_num_groups=8", "model.vae.layers_per_block=1", "model.clip.pretrained=null",
                  "model.unet.pretrained=null"]
    else:
        preset = list(PRESETS["random-weights-sd"])
    return load_config(REPO / "configs/sd/sd_256.yaml", [*preset, *extra])


def fit_overrides(dry_run: bool, shards: Path, run_dir: Path, max_steps: int) -> List[str]:
    """A short ``mmdiff fit`` of the demo config on the digits shards in ``shards``."""
    return [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
            f"run_dir={run_dir}", "logger.kind=csv", f"trainer.max_steps={max_steps}",
            "trainer.val_every_n_steps=100000", "trainer.checkpoint_every_n_steps=100000",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            # previews still run at the start and end of a fit: keep them to one 2-step prompt
            "sampling.every_n_steps=0", "sampling.steps=2", "sampling.prompts=[a handwritten digit one]",
            f"data.num_workers={0 if dry_run else 2}",
            "data.steps_per_epoch=7"]


def csv_losses(run_dir: Path, key: str = "train/loss") -> Dict[int, float]:
    """{logged step: value} over all CSVLogger versions of a run (later versions win)."""
    import csv

    out: Dict[int, float] = {}
    for version in sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])] = float(row[key])
    return out


# ------------------------------------------------------------------------------ batch finder
def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is a CUDA (or allocator) out-of-memory error."""
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory() -> None:
    """Release what a failed attempt left behind (its tensors die with its frames)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest batch in [1, ``limit``] for which ``fits(batch)`` is true: doubling from ``start``,
    then bisecting to within 1/16 of the answer. ``fits`` returns False on OOM. Returns 0 when
    even batch 1 does not fit."""
    lo, hi = 0, None
    b = max(1, min(start, limit))
    while True:
        if fits(b):
            lo = b
            if b >= limit:
                return lo
            b = min(2 * b, limit)
        else:
            hi = b
            break
    if lo == 0:  # start did not fit: halve down
        b = hi // 2
        while b >= 1 and not fits(b):
            hi, b = b, b // 2
        if b < 1:
            return 0
        lo = b
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------- sections
def _device(dry_run: bool) -> Any:
    import torch

    return torch.device("cpu" if dry_run else "cuda")


def _max_mb(device: Any) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def section_demo(dry_run: bool, params: Dict[str, Any]) -> Dict[str, Any]:
    """The demo config in fp32 and bf16-mixed: (a) framework / (b) plain-loop steps/s."""
    from mmdiff.jobs.bench import run_bench

    steps, warmup = (2, 1) if dry_run else (30, 5)
    out: Dict[str, Any] = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = demo_config(dry_run, [f"trainer.precision={precision}"])
        r = run_bench(cfg, sections=("train",), steps=steps, warmup=warmup, rounds=1,
                      device="cpu" if dry_run else "cuda", threads=1 if dry_run else None)
        tr = r["train"]
        out[precision] = {
            "batch_size": tr["batch_size"],
            **{f"{mode}_{kind}_steps_per_s": 1.0 / tr[mode][kind]["step_s"]
               for mode in ("online", "precomputed") for kind in ("framework", "plain")},
            "overhead_online": tr["online"]["overhead"], "overhead_precomputed": tr["precomputed"]["overhead"],
            "precomputed_speedup": tr["precomputed_speedup"], "memory": tr.get("memory", {}),
        }
        out["device_name"] = r["environment"].get("device_name", r["environment"]["device"])
    return out


def _sd_system(dry_run: bool, compile_mode: str) -> Any:
    import lightning as L

    from mmdiff.jobs.bench import use_stored_arrays
    from mmdiff.systems.speed import enable_tf32, prepare_unet
    from mmdiff.systems.text_to_image import TextToImageSystem

    cfg = sd_config(dry_run, compile_mode)
    dev = _device(dry_run)
    L.seed_everything(cfg.seed, verbose=False)
    system = TextToImageSystem(cfg)
    if float(system.latent_scale) == 0.0:
        system.latent_scale.fill_(1.0)
    system.to(dev)
    if dev.type == "cuda":
        enable_tf32(bool(cfg.trainer.tf32))
    return cfg, dev, system, (lambda: prepare_unet(system.unet, cfg.model.unet, dev)), use_stored_arrays


def _tile(batch: Dict[str, Any], n: int) -> Dict[str, Any]:
    """``batch`` repeated to ``n`` samples (contents do not change timings)."""
    import torch

    def rep(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.repeat(math.ceil(n / v.shape[0]), *([1] * (v.dim() - 1)))[:n]
        return [v[i % len(v)] for i in range(n)]

    return {k: rep(v) for k, v in batch.items()}


def section_sd_unet(dry_run: bool, params: Dict[str, Any], compile_mode: str) -> Dict[str, Any]:
    """SD-2-size U-Net, bf16-mixed, channels_last, precomputed latents: the largest batch that fits,
    and images/s, MFU and peak memory of ``Trainer.fit`` steps at that batch."""
    from mmdiff.jobs.bench import bench_flops, framework_steps, make_batch, peak_bf16_tflops, precomputed_batch

    cfg, dev, system, prepare, use_stored_arrays = _sd_system(dry_run, compile_mode)
    n_params = sum(p.numel() for p in system.unet.parameters())
    # FLOPs of the eager U-Net (compiling does not change them, and the counter cannot see inside).
    flops = bench_flops(system, cfg, dev)["unet_train_per_image"]
    system.unet.zero_grad(set_to_none=True)
    system.speed = prepare()
    small = make_batch(cfg, 4)
    pre = precomputed_batch(system, {"image": small["image"].to(dev), "caption": small["caption"]})
    use_stored_arrays(system)
    system.precomputed = True

    def steps_at(batch_size: int, steps: int, warmup: int) -> Dict[str, Any]:
        _reset_peak(dev)
        times = framework_steps(system, cfg, _tile(pre, batch_size), steps, warmup, dev)
        return {"times": times["wall"], "peak_mb": _max_mb(dev)}

    def fits(batch_size: int) -> bool:
        try:
            steps_at(batch_size, 0, 2)
            return True
        except Exception as err:  # noqa: BLE001 - only OOM means "does not fit"
            if not is_oom(err):
                raise
        free_memory()
        return False

    limit = int(params.get("batch_limit", 4 if dry_run else 4096))
    if compile_mode != "none":  # each batch recompiles: start from the eager run's answer, step down on OOM
        batch = int(params.get("batch") or (2 if dry_run else 64))
        while batch >= 1 and not fits(batch):
            batch = int(batch * 0.85)
        searched = False
    else:
        batch = largest_batch(fits, start=2 if dry_run else 32, limit=limit)
        searched = True
    if batch < 1:
        return {"error": "batch 1 does not fit in memory"}
    steps, warmup = (2, 1) if dry_run else (10, 3)
    got = steps_at(batch, steps, warmup)
    step_s = sorted(got["times"])[len(got["times"]) // 2]
    images_per_s = batch / step_s
    peak = params.get("peak_tflops") or peak_bf16_tflops(dev) or DEFAULT_PEAK_TFLOPS
    return {
        "compile": compile_mode, "unet_params": n_params, "unet_params_m": round(n_params / 1e6, 1),
        "precision": str(cfg.trainer.precision), "speed_switches": dict(system.speed),
        "image_size": int(cfg.data.image_size), "batch": batch, "batch_searched": searched,
        "batch_limit": limit, "step_s": step_s, "images_per_s": images_per_s,
        "unet_train_flops_per_image": flops, "achieved_tflops": flops * images_per_s / 1e12,
        "peak_bf16_tflops": peak if dev.type == "cuda" else None,
        "mfu": flops * images_per_s / (peak * 1e12) if dev.type == "cuda" else None,
        "peak_memory_mb": got["peak_mb"],
    }


def section_sampling(dry_run: bool, params: Dict[str, Any]) -> Dict[str, Any]:
    """DPM++2M, 20 steps, batch 1 and 16, on the SD-2-size system (bf16 U-Net switches as trained)."""
    from mmdiff.jobs.bench import bench_sampling

    cfg, dev, system, prepare, _ = _sd_system(dry_run, "none")
    system.speed = prepare()
    sizes, steps = ((1, 2), 2) if dry_run else ((1, 16), 20)
    r = bench_sampling(system, cfg, dev, batch_sizes=sizes, steps=steps, sampler="dpmpp_2m")
    return {"sampler": r["sampler"], "steps": r["steps"], "guidance_scale": r["guidance_scale"],
            "by_batch": {k: {"s_per_image": v["s_per_image"], "ms_per_unet_call": v["ms_per_unet_call"],
                             "peak_memory_mb": v.get("cuda_max_allocated_mb")} for k, v in r["by_batch"].items()}}


@contextlib.contextmanager
def _demo_shards(dry_run: bool):
    from mmdiff.data.writers import write_demo_shards

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        shards = Path(tmp) / "digits"
        write_demo_shards(shards, image_size=16 if dry_run else 32, seed=0)
        yield Path(tmp), shards


def _fit_losses(cfg: Any, resume: Optional[str] = None) -> Dict[int, float]:
    from mmdiff.run.training import fit

    run_dir = fit(cfg, resume=resume)
    return csv_losses(Path(run_dir))


def _finite(losses: Dict[int, float]) -> bool:
    return bool(losses) and all(math.isfinite(v) for v in losses.values())


def section_fsdp(dry_run: bool, params: Dict[str, Any]) -> Dict[str, Any]:
    """One fit step under FSDP2 on one rank (NCCL on a GPU, gloo on a dry run)."""
    with _demo_shards(dry_run) as (tmp, shards):
        cfg = demo_config(dry_run, [*fit_overrides(dry_run, shards, tmp / "run", 1), "trainer.strategy=fsdp",
                                    "trainer.devices=1", "trainer.precision=bf16-mixed",
                                    "model.unet.channels_last=true"])
        start = time.perf_counter()
        losses = _fit_losses(cfg)
    import torch.distributed as dist

    return {"backend": "gloo" if dry_run else "nccl", "precision": "bf16-mixed", "channels_last": True,
            "losses": list(losses.values()), "finite": _finite(losses),
            "seconds": time.perf_counter() - start, "process_group_left": dist.is_initialized()}


def section_fp16_scaler(dry_run: bool, params: Dict[str, Any]) -> Dict[str, Any]:
    """One fit step in 16-mixed: autocast fp16 with Lightning's GradScaler."""
    if dry_run:
        return {"skipped": "16-mixed needs a GPU (mmdiff refuses it on a CPU: check_precision)"}
    with _demo_shards(dry_run) as (tmp, shards):
        cfg = demo_config(dry_run, [*fit_overrides(dry_run, shards, tmp / "run", 2), "trainer.precision=16-mixed"])
        losses = _fit_losses(cfg)
    return {"precision": "16-mixed", "losses": list(losses.values()), "finite": _finite(losses)}


def section_fp16_vae(dry_run: bool, params: Dict[str, Any]) -> Dict[str, Any]:
    """One training step with an fp16 VAE whose encoder overflows: latents come from the fp32
    fallback and the step stays finite."""
    import lightning as L
    import torch

    from mmdiff.jobs.bench import framework_steps, make_batch
    from mmdiff.systems.text_to_image import TextToImageSystem

    cfg = demo_config(dry_run, ["model.vae.precision=fp16"])
    dev = _device(dry_run)
    L.seed_everything(cfg.seed, verbose=False)
    system = TextToImageSystem(cfg)
    system.latent_scale.fill_(1.0)
    w = system.vae.encoder.conv_in.weight
    with torch.no_grad():  # fp16 activations overflow, fp32 ones stay finite
        w.copy_((w.float() * 1e5).clamp(-6e4, 6e4).to(w.dtype))
    system.to(dev)
    batch = make_batch(cfg, int(cfg.data.batch_size))
    images = batch["image"].to(dev)
    with torch.no_grad():
        fault = not bool(torch.isfinite(system.vae.encode(images.half()).latent_dist.parameters).all())
        latents = system.batch_latents({"image": images, "caption": batch["caption"]})
    framework_steps(system, cfg, batch, 1, 1, dev)
    finite_params = all(bool(torch.isfinite(p).all()) for p in system.unet.parameters())
    return {"vae_dtype": str(system.vae.dtype), "fp16_encode_overflows": fault,
            "latents_dtype": str(latents.dtype), "latents_finite": bool(torch.isfinite(latents).all()),
            "unet_finite_after_step": finite_params,
            "ok": fault and bool(torch.isfinite(latents).all()) and finite_params}


def section_resume(dry_run: bool, params: Dict[str, Any]) -> Dict[str, Any]:
    """Exact resume: 20 straight steps against 10 steps + resume, deterministic algorithms on."""
    import torch

    torch.use_deterministic_algorithms(True)
    with _demo_shards(dry_run) as (tmp, shards):
        def cfg(run: str) -> Any:
            return demo_config(dry_run, [*fit_overrides(dry_run, shards, tmp / run, 20),
                                         "trainer.checkpoint_every_n_steps=10", "trainer.keep_last_n=5",
                                         "trainer.deterministic=true"])

        straight = _fit_losses(cfg("straight"))
        step10 = [p for p in sorted((tmp / "straight" / "checkpoints").glob("*.ckpt"))
                  if torch.load(p, map_location="cpu", weights_only=True)["global_step"] == 10]
        if not step10:
            return {"error": "no step-10 checkpoint was written"}
        resumed = _fit_losses(cfg("resumed"), resume=str(step10[0]))
    steps = list(range(10, 20))  # logged steps 10..19 = training steps 11..20
    missing = [s for s in steps if s not in straight or s not in resumed]
    if missing:
        return {"error": f"losses of logged steps {missing} are missing"}
    diff = max(abs(straight[s] - resumed[s]) for s in steps)
    return {"deterministic": True, "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "max_abs_loss_diff_steps_11_20": diff, "exact": diff == 0.0, "ok": diff <= 1e-6,
            "losses_straight": [straight[s] for s in steps], "losses_resumed": [resumed[s] for s in steps]}


def section_sd_unet_regional(dry_run: bool, params: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`section_sd_unet` with every U-Net block compiled on its own.

    Skipped in a dry run: inductor compiles each block's forward and backward to C++ on a CPU,
    which took over six minutes on a 2-core machine; the section's code is the eager section's,
    and tests/perf/test_speed.py checks the regional wrapping itself."""
    if dry_run:
        return {"skipped": "a dry run does not compile (minutes of C++ builds on a CPU); the eager section ran the same code"}
    return section_sd_unet(dry_run, params, "regional")


RUNNERS: Dict[str, Callable[[bool, Dict[str, Any]], Dict[str, Any]]] = {
    "demo": section_demo,
    "sd_unet_eager": lambda d, p: section_sd_unet(d, p, "none"),
    "sd_unet_regional": lambda d, p: section_sd_unet_regional(d, p),
    "sampling": section_sampling,
    "fsdp": section_fsdp,
    "fp16_scaler": section_fp16_scaler,
    "fp16_vae": section_fp16_vae,
    "resume": section_resume,
}


def run_section(name: str, dry_run: bool, params: Dict[str, Any]) -> Dict[str, Any]:
    """Run one section in this process; return its entry (``status`` ok / skipped / error)."""
    start = time.perf_counter()
    try:
        got = RUNNERS[name](dry_run, params)
    except Exception as err:  # noqa: BLE001 - recorded, so the other sections still run
        log.exception("gpu check: section %s failed", name)
        got = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:500]}
    if "skipped" in got:
        entry = {"status": "skipped", "reason": got["skipped"]}
    elif "error" in got:
        entry = {"status": "error", **got}
    elif got.get("ok") is False or got.get("finite") is False:
        entry = {"status": "error", "error": "the check's condition failed (see its figures)", **got}
    else:
        entry = {"status": "ok", **got}
    entry["seconds"] = time.perf_counter() - start
    return entry
