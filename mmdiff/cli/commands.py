"""What each ``mmdiff`` subcommand does with its parsed arguments: thin calls into the Python API.

Heavy libraries are imported inside the commands, so ``mmdiff config`` and ``--help`` stay free of
torch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

from mmdiff.cli.arguments import output_folder, picture_size, sampling_options, size_options
from mmdiff.config import load_config, to_yaml
from mmdiff.errors import UsageError
from mmdiff.io.textfiles import read_user_text

log = logging.getLogger("mmdiff")


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.run.training import fit

    fit(cfg, resume=args.resume, fresh=args.fresh)  # its last log line says how the run ended
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from mmdiff.run.wandb_sync import sync_offline_runs

    return sync_offline_runs(cfg.run_dir)


def cmd_sweep(args: argparse.Namespace) -> int:
    import shlex

    from mmdiff.config.sweeps import fit_arguments, read_sweep

    config_is_override = args.config is not None and "=" in args.config and not Path(args.config).is_file()
    if (args.overrides and args.config is None) or config_is_override:
        raise UsageError("overrides need a config: mmdiff sweep SWEEP.yaml CONFIG key=value ...")
    sweep = read_sweep(args.sweep)
    if args.task is not None:
        sys.stdout.write("".join(f"{a}\n" for a in fit_arguments(sweep, args.task, args.config, args.overrides)))
        return 0
    lines = [f"sweep {sweep.name} ({sweep.source}): {len(sweep.tasks)} task(s)"]
    for i in range(len(sweep.tasks)):
        lines.append(f"  task {i}: {shlex.join(fit_arguments(sweep, i, args.config, args.overrides))}")
    config = shlex.quote(args.config) if args.config is not None else "CONFIG"
    lines.append(f"submit: sbatch --array={sweep.array} slurm/sweep.sbatch {config} {shlex.quote(args.sweep)}"
                 + "".join(f" {shlex.quote(o)}" for o in args.overrides))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _read_prompts(path: Optional[str]) -> List[str]:
    """The non-empty lines of a prompts file (none without a file)."""
    if path is None:
        return []
    return [line.strip() for line in read_user_text(path, "prompts file").splitlines() if line.strip()]


def _checked_size(system, args: argparse.Namespace) -> Dict[str, int]:
    """``{"height": H, "width": W}`` of the images to sample: ``--height`` / ``--width`` (default: the
    checkpoint's data.image_size), refused in one line when the model cannot take them."""
    try:
        grid = system.latent_grid(**picture_size(args))
    except ValueError as err:
        raise UsageError(f"{err} (--width/--height with '{args.ckpt}')") from None
    return {"height": grid[0] * system.vae_factor, "width": grid[1] * system.vae_factor}


def cmd_sample(args: argparse.Namespace) -> int:
    prompts: List[str] = list(args.prompt or []) + _read_prompts(args.prompts_file)
    if not prompts:
        raise UsageError("no prompts given; pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    if args.init_image is None and (args.mask is not None or args.strength is not None):
        raise UsageError(f"{'--mask' if args.mask is not None else '--strength'} needs --init-image IMG, "
                         "the image to start from.")
    if args.prior and args.init_image is not None:
        raise UsageError("--init-image is for one-stage sampling; leave out --prior.")
    if args.prior and size_options(args):
        raise UsageError("--original-size, --crop-top-left and --target-size are for SDXL checkpoints; leave out --prior.")
    if args.prior and args.lora_scale is not None:
        raise UsageError("--lora-scale is for one-stage sampling; leave out --prior.")
    if args.prior:
        return _sample_two_stage(args, prompts)
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.inference.api import load
    from mmdiff.inference.sample_files import init_tensors, read_init_images, write_samples

    init = read_init_images(args.init_image, args.mask) if args.init_image is not None else None
    system = load(args.ckpt, expect="text_to_image", use_ema=not args.no_ema, device=args.device)
    image_options = size_options(args)
    if image_options and not getattr(system, "micro_conditioning", False):
        raise UsageError(f"--{next(iter(image_options)).replace('_', '-')} is SDXL micro-conditioning; the U-Net "
                         f"of '{args.ckpt}' takes no size/crop ids (leave the size flags out).")
    if args.lora_scale is not None:
        if getattr(system, "lora", None) is None:
            raise UsageError(f"--lora-scale needs a checkpoint trained with LoRA adapters; '{args.ckpt}' has none.")
        image_options["lora_scale"] = args.lora_scale
    image_options.update(_checked_size(system, args))
    if init is not None:
        image_options["init_image"], image_options["mask"] = init_tensors(
            *init, image_options["height"], image_options["width"])
        strength = args.strength if args.strength is not None else float(system.cfg.sampling.strength)
        if args.mask is None and strength >= 1.0:
            log.warning("strength 1 starts from pure noise and ignores the init image; pass --strength below 1")
    out = write_samples(
        system,
        prompts,
        n_per_prompt=args.n,
        out_dir=args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        **sampling_options(args),
        **image_options,
    )
    log.info("wrote %d images and %s", args.n * len(prompts), out / "grid.png")
    return 0


# ------------------------------------------------------------------------------------- unCLIP
def _unclip_decoder(args: argparse.Namespace):
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.inference.unclip import load_decoder

    return load_decoder(args.ckpt, use_ema=not args.no_ema, device=args.device)


def _write_images(images, out: str, nrow: int) -> Path:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.io.images import grid, save_png, to_pil

    folder = Path(out)
    for index, picture in enumerate(to_pil(images)):
        save_png(picture, folder / f"{index:04d}.png")
    save_png(grid(images, nrow=nrow), folder / "grid.png")
    log.info("wrote %d images and %s", len(images), folder / "grid.png")
    return folder


def _sample_two_stage(args: argparse.Namespace, prompts: List[str]) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    import torch

    from mmdiff.inference.api import load
    from mmdiff.inference.unclip import check_pair, two_stage_sample

    prior = load(args.prior, expect="prior", use_ema=not args.no_ema, device=args.device)
    decoder = _unclip_decoder(args)
    check_pair(prior, decoder)
    size = _checked_size(decoder, args)
    expanded = [p for p in prompts for _ in range(args.n)]
    chunks = [expanded[i : i + args.batch_size] for i in range(0, len(expanded), args.batch_size)]
    images = [two_stage_sample(prior, decoder, chunk, seed=args.seed + i,
                               prior_options={"guidance_scale": args.prior_cfg},
                               **sampling_options(args), **size).cpu()
              for i, chunk in enumerate(chunks)]
    _write_images(torch.cat(images), args.out, nrow=args.n)
    return 0


def cmd_vary(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.data.transforms import read_image_file
    from mmdiff.inference.unclip import vary

    decoder = _unclip_decoder(args)
    image = read_image_file(args.image, int(decoder.cfg.data.image_size))
    _write_images(vary(decoder, image, args.n, seed=args.seed, prompt=args.prompt, **sampling_options(args)),
                  args.out, nrow=args.n)
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    if args.n < 2:
        raise UsageError(f"--n must be at least 2 (the two ends), got {args.n}.")
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.data.transforms import read_image_file
    from mmdiff.inference.unclip import interpolate

    decoder = _unclip_decoder(args)
    size = int(decoder.cfg.data.image_size)
    frames = interpolate(decoder, read_image_file(args.image_a, size), read_image_file(args.image_b, size), args.n,
                         seed=args.seed, prompt=args.prompt, **sampling_options(args))
    _write_images(frames, args.out, nrow=args.n)
    return 0


def cmd_shards_demo(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.data.writers import write_demo_shards

    written = write_demo_shards(args.out, image_size=args.image_size, seed=args.seed)
    for split, paths in written.items():
        log.info("%s: %d shards in %s", split, len(paths), args.out)
    return 0


def cmd_shards_folder(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.data.img2dataset import write_img2dataset_shards
    from mmdiff.data.writers import write_folder_shards

    if args.layout == "img2dataset":
        if args.prefix != "shard":
            raise UsageError("--prefix names mmdiff-layout shards; img2dataset's are named NNNNN.tar.")
        paths = write_img2dataset_shards(args.src, args.out, manifest=args.manifest, shard_size=args.shard_size)
    else:
        paths = write_folder_shards(
            args.src, args.out, manifest=args.manifest, shard_size=args.shard_size, prefix=args.prefix
        )
    log.info("wrote %d shards to %s", len(paths), args.out)
    return 0


def cmd_eval_digits(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.inference.api import load
    from mmdiff.eval.digit_judge import evaluate_digits

    system = load(args.ckpt, expect="text_to_image", use_ema=not args.no_ema, device=args.device)
    result = evaluate_digits(
        system,
        n_per_digit=args.n,
        seed=args.seed,
        out=args.out,
        **sampling_options(args),
    )
    sys.stdout.write(result.summary() + "\n")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.inference.api import load
    from mmdiff.inference.caption_files import caption_files

    system = load(args.ckpt, expect="captioning", use_ema=not args.no_ema, device=args.device)
    try:
        results = caption_files(
            system, args.images, batch_size=args.batch_size, seed=args.seed, decoding=args.decoding,
            steps=args.steps, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            beam_size=args.beam_size, complete=args.complete, denoise=args.denoise, strength=args.strength,
        )
    except ValueError as err:  # an option the checkpoint's head cannot use (e.g. beam for masked)
        raise UsageError(str(err)) from None
    for result in results:
        if result.ok:
            sys.stdout.write(f"{result.path}\t{result.caption}\n")
        else:
            sys.stderr.write(f"error: {result.error}\n")
    return 0 if all(r.ok for r in results) else 1


def cmd_eval_roundtrip(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.inference.api import load
    from mmdiff.eval.caption_metrics import roundtrip_digits

    t2i = load(args.t2i_ckpt, expect="text_to_image", use_ema=not args.no_ema, device=args.device)
    captioner = load(args.caption_ckpt, expect="captioning", use_ema=not args.no_ema, device=args.device)
    result = roundtrip_digits(
        t2i, captioner, n_per_digit=args.n, seed=args.seed, out=args.out,
        sample_options=sampling_options(args),
        caption_options={"decoding": args.decoding, "steps": args.caption_steps},
    )
    sys.stdout.write(result.summary() + "\n")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.data.precomputed import FRAGMENT
    from mmdiff.jobs.precompute import fragment_overrides, precompute

    result = precompute(cfg, args.out, splits=args.split or ("train", "val"), batch_size=args.batch_size,
                        device=args.device, overwrite=args.overwrite, progress=not args.no_progress)
    if result.rank == 0:
        log.info("train from them: add %s to your config's base: list, or pass\n  %s",
                 result.out_dir / FRAGMENT,
                 " ".join(fragment_overrides(result.out_dir, cfg.model.precompute_latents, list(result.samples))))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    presets = []
    if args.preset:
        # Imported in the command: `mmdiff --help` and config errors stay free of torch.
        from mmdiff.jobs.bench import PRESETS

        if args.preset not in PRESETS:
            raise UsageError(f"unknown --preset '{args.preset}'; choose one of: {', '.join(PRESETS)}.")
        presets = PRESETS[args.preset]
    cfg = load_config(args.config, [*presets, *args.overrides])
    from mmdiff.jobs.bench import DEFAULT_SECTIONS, format_table, run_bench, write_json

    sections = args.only.split(",") if args.only else DEFAULT_SECTIONS
    result = run_bench(cfg, steps=args.steps, warmup=args.warmup, rounds=args.rounds, block=args.block, sections=sections,
                       device=args.device, peak_tflops=args.peak_tflops, threads=args.threads,
                       precomputed_dir=args.precomputed)
    sys.stdout.write(format_table(result) + "\n")
    if args.json:
        log.info("wrote %s", write_json(result, args.json))
    return 0


# ------------------------------------------------------------------ interop and image metrics
def cmd_export(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.inference.api import load
    from mmdiff.inference.export import export_folder, export_single_file, read_metrics
    from mmdiff.inference.lora_export import export_lora

    if args.out is None and args.lora is None:
        raise UsageError("mmdiff export needs --out OUT (the model) or --lora OUT (a LoRA model's adapters).")
    folders = ([("--out", args.out)] if args.out is not None and args.format == "diffusers" else []) \
        + ([("--lora", args.lora)] if args.lora is not None else [])
    for flag, folder in folders:  # checked before the checkpoint is loaded
        try:
            output_folder(folder)
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"mmdiff export: argument {flag}: {err}.") from None
    metrics = read_metrics(args.metrics or [])
    system = load(args.ckpt, expect="text_to_image", use_ema=not args.no_ema, device="cpu")
    if args.lora is not None:
        log.info("wrote %s", export_lora(system, args.lora))
        if args.out is None:
            return 0
    if args.format == "safetensors":
        out = export_single_file(system, args.out, ckpt=args.ckpt, use_ema=not args.no_ema)
    else:
        out = export_folder(system, args.out, ckpt=args.ckpt, use_ema=not args.no_ema, metrics=metrics)
    log.info("wrote %s", out)
    return 0


def cmd_eval_images(args: argparse.Namespace) -> int:
    metric = args.eval_command
    prompts = _read_prompts(args.prompts)
    if metric != "clipscore" and not args.reference:
        raise UsageError(f"{metric} needs --reference SHARDS (the real images to compare with).")
    if not prompts and not args.reference:
        raise UsageError("no prompts: pass --prompts FILE (or --reference SHARDS to use their captions).")
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.inference.api import load
    from mmdiff.eval.generative import cycle_prompts, generate_images, score_images, write_json
    from mmdiff.eval.generative import warn_cut_prompts

    system = load(args.ckpt, expect="text_to_image", use_ema=not args.no_ema, device=args.device)
    e = system.cfg.eval
    reference, captions = None, []
    if args.reference:
        from mmdiff.data.reference import read_reference

        reference, captions = read_reference(args.reference, system.cfg.data.image_size, args.n_reference or args.n)
    prompts = cycle_prompts(prompts or captions, args.n)
    extractor = None
    if metric != "clipscore":
        from mmdiff.eval.features import build_extractor

        try:
            extractor = build_extractor(args.extractor or e.extractor, clip=system.clip,
                                        inception_weights=args.inception_weights or e.inception_weights,
                                        clip_name=str(system.cfg.model.clip.name)).to(system.device)
        except ValueError as err:
            raise UsageError(str(err)) from None
    options = sampling_options(args)
    warn_cut_prompts(system, list(dict.fromkeys(prompts)))  # each distinct prompt once
    images = generate_images(lambda p, seed: system.sample(p, seed=seed, **options), prompts, args.batch_size, args.seed)
    result = score_images(
        images, prompts, [metric], reference=reference, extractor=extractor,
        encode_image=lambda x: system.clip.encode_image(x)[0], encode_text=lambda p: system.encode_prompts(p)["pooled"],
        clip_model=str(system.cfg.model.clip.name), batch_size=args.batch_size,
    )
    result.update(checkpoint=str(args.ckpt), seed=args.seed, **{k: v for k, v in options.items() if v is not None})
    path = write_json(result, Path(args.out) / f"{metric}.json")
    if not args.no_wandb and system.cfg.logger.kind == "wandb":
        from mmdiff.eval.wandb_log import log_eval_to_wandb
        from mmdiff.run.wandb_run import eval_run_options

        options = eval_run_options(system.cfg)
        config = {"checkpoint": str(args.ckpt), "training_run_id": options.pop("training_run_id")}
        log_eval_to_wandb(result, out_dir=args.out, name=f"{system.cfg.name}-eval-{metric}", config=config,
                          **options)
    sys.stdout.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()) + "\n")
    log.info("wrote %s", path)
    return 0
