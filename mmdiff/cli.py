"""The ``mmdiff`` command: a thin argparse layer over mmdiff's Python API.

Every user error ends in one line on stderr and a non-zero exit code (2 for config and usage
errors), never a traceback. Heavy libraries are imported inside the subcommands so that
``mmdiff config`` and ``--help`` answer in well under a second.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from mmdiff.config import load_config, to_yaml
from mmdiff.diffusion.options import SamplingOptions, option_fields, option_names, option_problem
from mmdiff.errors import MmdiffError, UsageError
from mmdiff.io.textfiles import read_user_text

log = logging.getLogger("mmdiff")

EPILOG = """examples:
  mmdiff shards demo data/digits                  # digits → webdataset shards
  mmdiff fit configs/demo/vae.yaml                # train the demo VAE
  mmdiff fit configs/demo/text_to_image.yaml trainer.max_steps=100
  mmdiff sample runs/demo/t2i/checkpoints/last.ckpt --prompt "a handwritten digit seven" --n 8
  mmdiff sample CKPT --prompt "a handwritten digit one" --init-image seven.png --strength 0.6 [--mask m.png]
  mmdiff config configs/demo/text_to_image.yaml   # print the resolved config
  mmdiff export runs/demo/t2i/checkpoints/last.ckpt --out export/t2i   # diffusers folder
"""


# --------------------------------------------------------------------------------- subcommands
def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.run.training import fit

    run_dir = fit(cfg, resume=args.resume)
    log.info("done: checkpoints in %s", Path(run_dir) / "checkpoints")
    return 0


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None


def _finite_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _ranged(name: str, parse: Callable[[str], Any], ok: Callable[[Any], bool], requirement: str,
            doc: str) -> Callable[[str], Any]:
    """An argparse type: ``parse`` the text, then refuse values outside the range ``ok`` accepts."""
    def convert(text: str) -> Any:
        value = parse(text)
        if not ok(value):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {shown}")
        return value

    convert.__name__, convert.__doc__ = name, doc
    return convert


positive_int = _ranged("positive_int", _whole_number, lambda v: v > 0, "a positive number",
                       "argparse type for counts (images, steps, batch sizes): an integer of at least 1.")
non_negative_int = _ranged("non_negative_int", _whole_number, lambda v: v >= 0, "zero or more",
                           "argparse type for counts that may be zero (warm-up steps): an integer of at least 0.")
non_negative_float = _ranged("non_negative_float", _finite_number, lambda v: v >= 0, "zero or more",
                             "argparse type for scales and temperatures (guidance, eta): a number >= 0.")
positive_float = _ranged("positive_float", _finite_number, lambda v: v > 0, "more than zero",
                         "argparse type for rates and capacities (peak TFLOP/s): a number > 0.")
unit_fraction = _ranged("unit_fraction", _finite_number, lambda v: 0 < v <= 1, "in (0, 1]",
                        "argparse type for shares (top-p mass, re-masked share): a number in (0, 1].")


def output_folder(text: str) -> str:
    """argparse type for an output folder: absent (it is created later) or an existing folder.

    Checked before any work starts, without creating anything: a path naming a file, or under a
    file, would otherwise fail only when the first result is written.
    """
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a file, not a folder; pass a folder path")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if not path.exists() and parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' cannot be created: '{parent}' is a file")
    return text


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line UsageErrors, like every other mmdiff error
    (argparse's own prints the whole usage block and exits from inside parse_args)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help).")


def _read_prompts(path: Optional[str]) -> List[str]:
    """The non-empty lines of a prompts file (none without a file)."""
    if path is None:
        return []
    return [line.strip() for line in read_user_text(path, "prompts file").splitlines() if line.strip()]


def cmd_sample(args: argparse.Namespace) -> int:
    prompts: List[str] = list(args.prompt or []) + _read_prompts(args.prompts_file)
    if not prompts:
        raise UsageError("no prompts given; pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    if args.init_image is None and (args.mask is not None or args.strength is not None):
        raise UsageError(f"{'--mask' if args.mask is not None else '--strength'} needs --init-image IMG, "
                         "the image to start from.")
    if args.prior and args.init_image is not None:
        raise UsageError("--init-image is for one-stage sampling; leave out --prior.")
    if args.prior:
        return _sample_two_stage(args, prompts)
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.inference.api import load
    from mmdiff.inference.sample_files import init_tensors, read_init_images, write_samples

    init = read_init_images(args.init_image, args.mask) if args.init_image is not None else None
    system = load(args.ckpt, expect="text_to_image", use_ema=not args.no_ema, device=args.device)
    image_options = {}
    if init is not None:
        image_options["init_image"], image_options["mask"] = init_tensors(*init, int(system.cfg.data.image_size))
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
    expanded = [p for p in prompts for _ in range(args.n)]
    chunks = [expanded[i : i + args.batch_size] for i in range(0, len(expanded), args.batch_size)]
    images = [two_stage_sample(prior, decoder, chunk, seed=args.seed + i,
                               prior_options={"guidance_scale": args.prior_cfg},
                               **sampling_options(args)).cpu()
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


def _unclip_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vary", help="unCLIP: variations of an image from its CLIP image embedding")
    p.add_argument("ckpt", help="text_to_image checkpoint trained with model.image_embed_conditioning")
    p.add_argument("image", help="image file")
    p.add_argument("--n", type=positive_int, default=8, help="variations (default 8)")
    p.add_argument("--prompt", default="", help="caption the decoder also sees (default: none)")
    p.add_argument("--out", type=output_folder, default="variations", help="output folder (default ./variations)")
    _sampling_options(p)
    p.set_defaults(func=cmd_vary)
    p = sub.add_parser("interpolate", help="unCLIP: decode a slerp between two images' CLIP embeddings")
    p.add_argument("ckpt", help="text_to_image checkpoint trained with model.image_embed_conditioning")
    p.add_argument("image_a", help="first image file")
    p.add_argument("image_b", help="last image file")
    p.add_argument("--n", type=positive_int, default=8, help="frames, both ends included (default 8)")
    p.add_argument("--prompt", default="", help="caption the decoder also sees (default: none)")
    p.add_argument("--out", type=output_folder, default="interpolation", help="output folder (default ./interpolation)")
    _sampling_options(p)
    p.set_defaults(func=cmd_interpolate)


def cmd_shards_demo(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.data.writers import write_demo_shards

    written = write_demo_shards(args.out, image_size=args.image_size, seed=args.seed)
    for split, paths in written.items():
        log.info("%s: %d shards in %s", split, len(paths), args.out)
    return 0


def cmd_shards_folder(args: argparse.Namespace) -> int:
    # Imported in the command: `mmdiff --help` and config errors stay free of torch.
    from mmdiff.data.writers import write_folder_shards

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
    from mmdiff.jobs.bench import format_table, run_bench, write_json

    sections = args.only.split(",") if args.only else ("train", "fit", "loader", "flops", "sampling")
    result = run_bench(cfg, steps=args.steps, warmup=args.warmup, rounds=args.rounds, sections=sections,
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

    if args.format == "diffusers":  # a folder; checked before the checkpoint is loaded
        try:
            output_folder(args.out)
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"mmdiff export: argument --out: {err}.") from None
    metrics = read_metrics(args.metrics or [])
    system = load(args.ckpt, expect="text_to_image", use_ema=not args.no_ema, device="cpu")
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

        log_eval_to_wandb(result, project=system.cfg.logger.project, out_dir=args.out,
                          mode=system.cfg.logger.mode,
                          name=f"{system.cfg.name}-eval-{metric}", config={"checkpoint": str(args.ckpt)})
    sys.stdout.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()) + "\n")
    log.info("wrote %s", path)
    return 0


def _add_interop_parsers(sub: argparse._SubParsersAction, evals: argparse._SubParsersAction) -> None:
    for metric, text in (("fid", "Fréchet distance of generated to reference images"),
                         ("kid", "kernel (MMD) distance of generated to reference images"),
                         ("clipscore", "CLIP score of generated images against their prompts")):
        p = evals.add_parser(metric, help=text)
        p.add_argument("ckpt", help="text_to_image checkpoint")
        p.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one per line (cycled to --n)")
        p.add_argument("--reference", action="append", metavar="SHARDS",
                       help="reference image shards (repeatable); their captions are the default prompts")
        p.add_argument("--n", type=positive_int, default=256, help="generated images (default 256)")
        p.add_argument("--n-reference", type=positive_int, default=None, help="reference images (default --n)")
        p.add_argument("--extractor", choices=["clip", "inception"], default=None,
                       help="FID/KID features (default: the config's eval.extractor)")
        p.add_argument("--inception-weights", default=None, metavar="FILE",
                       help="local FID Inception weights (default: eval.inception_weights)")
        p.add_argument("--batch-size", type=positive_int, default=32, help="images per sampler call (default 32)")
        p.add_argument("--out", type=output_folder, default="eval", help="folder for METRIC.json and the W&B run (default ./eval)")
        p.add_argument("--no-wandb", action="store_true", help="do not log the numbers to W&B")
        _sampling_options(p)
        p.set_defaults(func=cmd_eval_images)

    p = sub.add_parser("export", help="write a text-to-image checkpoint as a diffusers/open_clip folder")
    p.add_argument("ckpt", help="text_to_image checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="output folder (or .safetensors file with --format safetensors)")
    p.add_argument("--format", choices=["diffusers", "safetensors"], default="diffusers",
                   help="diffusers folder (default) or one .safetensors file")
    p.add_argument("--metrics", action="append", metavar="JSON", help="metrics JSON for the model card (repeatable)")
    p.add_argument("--no-ema", action="store_true", help="export raw weights even if EMA weights exist")
    p.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------------- parser
def sampling_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The sampling options given on the command line (the others keep the checkpoint config's)."""
    return {name: getattr(args, name) for name in option_names() if getattr(args, name) is not None}


def _option_type(f: dataclasses.Field) -> Callable[[str], Any]:
    """argparse type of a sampling option: parsed by its field type, checked as the config checks it."""
    kind = typing.get_type_hints(SamplingOptions)[f.name]
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
    parse = {int: _whole_number, float: _finite_number}.get(kind, str)

    def convert(text: str) -> Any:
        value = parse(text)
        problem = option_problem(f.name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem.rstrip("."))  # argparse adds its own ending
        return value

    convert.__name__ = f.name
    return convert


def _sampling_options(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`SamplingOptions` field (``--guidance-scale`` for ``guidance_scale``)."""
    for f in option_fields():
        meta = f.metadata
        default = meta["cli_default"]
        shown = f"default {default}" if default is not None else "default: the config's"
        listed = f": {', '.join(meta['choices'])}" if meta["choices"] else ""
        p.add_argument(f"--{f.name.replace('_', '-')}", *meta["flags"], dest=f.name, type=_option_type(f),
                       default=default, metavar="NAME" if meta["choices"] else None,
                       help=f"{meta['help']}{listed} ({shown})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--no-ema", action="store_true", help="use raw weights even if EMA weights exist")


def build_parser() -> argparse.ArgumentParser:
    """The full ``mmdiff`` argument parser."""
    parser = OneLineParser(
        prog="mmdiff",
        description="Train and sample multimodal diffusion models (text→image, image→text).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config (checks every key and type)")
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("fit", help="train the system a config describes")
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=16")
    p.add_argument("--resume", metavar="CKPT", help="'last' (this run's last checkpoint) or a .ckpt path")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("sample", help="generate images from prompts with a text-to-image checkpoint")
    p.add_argument("ckpt", help="text_to_image checkpoint (.ckpt)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--n", type=positive_int, default=4, help="images per prompt (default 4)")
    p.add_argument("--out", type=output_folder, default="samples", help="output folder (default ./samples)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per sampler call (default 64)")
    p.add_argument("--prior", metavar="PRIOR_CKPT", default=None,
                   help="unCLIP: a prior checkpoint; CKPT is then its image-embedding decoder")
    p.add_argument("--prior-cfg", type=non_negative_float, default=None, help="the prior's guidance scale (default: its config's)")
    p.add_argument("--init-image", metavar="IMG", default=None,
                   help="img2img: start from this image, noised to --strength (resized and centre-cropped)")
    p.add_argument("--mask", metavar="MASK", default=None,
                   help="inpainting, with --init-image: an image of its size, white = regenerate, black = keep")
    _sampling_options(p)
    p.set_defaults(func=cmd_sample)
    _unclip_parsers(sub)

    shards = sub.add_parser("shards", help="write webdataset shards").add_subparsers(
        dest="shards_command", metavar="KIND", required=True
    )
    p = shards.add_parser("demo", help="scikit-learn's digits as captioned image shards")
    p.add_argument("out", type=output_folder, help="output folder")
    p.add_argument("--image-size", type=positive_int, default=32, help="side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="caption/split seed (default 0)")
    p.set_defaults(func=cmd_shards_demo)
    p = shards.add_parser("folder", help="an image folder with .txt captions (or a manifest)")
    p.add_argument("src", help="image folder (ignored with --manifest, which lists paths)")
    p.add_argument("out", type=output_folder, help="output folder")
    p.add_argument("--manifest", help="CSV (path,caption) or JSONL manifest instead of sidecars")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    p.set_defaults(func=cmd_shards_folder)

    evals = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(
        dest="eval_command", metavar="METRIC", required=True
    )
    p = evals.add_parser("digits", help="digit accuracy of text-to-image samples (independent SVC)")
    p.add_argument("ckpt", help="text_to_image checkpoint trained on the digits demo")
    p.add_argument("--n", type=positive_int, default=20, help="samples per digit (default 20)")
    p.add_argument("--out", type=output_folder, default=None, help="folder for a JSON report and sample grid")
    _sampling_options(p)
    p.set_defaults(func=cmd_eval_digits)
    p = evals.add_parser("roundtrip", help="text → image → caption: does the caption name the prompted digit?")
    p.add_argument("t2i_ckpt", help="text_to_image checkpoint trained on the digits demo")
    p.add_argument("caption_ckpt", help="captioning checkpoint")
    p.add_argument("--n", type=positive_int, default=10, help="samples per digit (default 10)")
    p.add_argument("--out", type=output_folder, default=None, help="folder for a JSON report and sample grid")
    p.add_argument("--decoding", choices=["greedy", "beam", "topk", "topp"], default=None,
                   help="caption decoding (default: the config's)")
    p.add_argument("--caption-steps", type=positive_int, default=None, help="masked caption head steps")
    _sampling_options(p)
    p.set_defaults(func=cmd_eval_roundtrip)

    p = sub.add_parser("caption", help="caption image files with a captioning checkpoint (path<TAB>caption)")
    p.add_argument("ckpt", help="captioning checkpoint (.ckpt)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--decoding", choices=["greedy", "beam", "topk", "topp"], default=None,
                   help="default: the config's (beam is for the ar head)")
    p.add_argument("--steps", type=positive_int, default=None, help="masked head: denoising steps")
    p.add_argument("--complete", default=None, metavar="TEXT", help="continue this caption start")
    p.add_argument("--denoise", default=None, metavar="TEXT", help="masked head: re-noise and denoise this caption")
    p.add_argument("--strength", type=unit_fraction, default=None, help="with --denoise: share re-masked (default 0.5)")
    p.add_argument("--temperature", type=non_negative_float, default=None, help="sampling temperature (topk/topp)")
    p.add_argument("--top-k", type=positive_int, default=None, help="topk: tokens kept")
    p.add_argument("--top-p", type=unit_fraction, default=None, help="topp: probability mass kept")
    p.add_argument("--beam-size", type=positive_int, default=None, help="beam: beams kept")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--no-ema", action="store_true", help="use raw weights even if EMA weights exist")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("precompute", help="encode a text-to-image config's shards once into latent/text-state shards")
    p.add_argument("config", help="experiment YAML file (the image-shard config)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.precompute_dtype=fp32")
    p.add_argument("--out", type=output_folder, required=True, help="output folder for the precomputed shards")
    p.add_argument("--split", action="append", choices=["train", "val"], help="only this split (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="encoder batch (default data.val_batch_size)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: this rank's GPU)")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing output shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("bench", help="measure training, loader, FLOPs, memory and sampling speed of a config")
    p.add_argument("config", help="text_to_image experiment YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.precision=bf16-mixed")
    p.add_argument("--steps", type=positive_int, default=20, help="timed training steps per run (default 20)")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--rounds", type=positive_int, default=2, help="interleaved repetitions (default 2)")
    p.add_argument("--only", default=None, help="comma list of sections: train,fit,loader,flops,sampling")
    p.add_argument("--precomputed", default=None, metavar="DIR",
                   help="an `mmdiff precompute` folder of this config: also time fit from its shards")
    p.add_argument("--preset", default=None, help="extra overrides by name, e.g. random-weights-sd")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: the config's accelerator)")
    p.add_argument("--peak-tflops", type=positive_float, default=None, help="device peak for MFU if not in the table")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads for the run (default: torch's)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)
    _add_interop_parsers(sub, evals)
    return parser


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error: what failed, on which path, and how to see more."""
    what = err.strerror or type(err).__name__
    paths = " -> ".join(f"'{p}'" for p in (err.filename, err.filename2) if p is not None)
    return f"{what}{': ' + paths if paths else ''} ({type(err).__name__}; run with -v for the traceback)."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for name in ("lightning.pytorch", "lightning.fabric"):  # they keep their own console handler
        logging.getLogger(name).propagate = False
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except MmdiffError as err:
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    except OSError as err:  # disk full, permission denied, a path that turned into a file, ...
        log.debug("file system error", exc_info=True)
        sys.stderr.write(f"error: {describe_os_error(err)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
