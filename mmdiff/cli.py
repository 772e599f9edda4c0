"""The ``mmdiff`` command: a thin argparse layer over mmdiff's Python API.

Every user error ends in one line on stderr and a non-zero exit code (2 for config and usage
errors), never a traceback. Heavy libraries are imported inside the subcommands so that
``mmdiff config`` and ``--help`` answer in well under a second.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from mmdiff.errors import MmdiffError, UsageError

log = logging.getLogger("mmdiff")

EPILOG = """examples:
  mmdiff shards demo data/digits                  # digits → webdataset shards
  mmdiff fit configs/demo/vae.yaml                # train the demo VAE
  mmdiff fit configs/demo/text_to_image.yaml trainer.max_steps=100
  mmdiff sample runs/demo/t2i/checkpoints/last.ckpt --prompt "a handwritten digit seven" --n 8
  mmdiff config configs/demo/text_to_image.yaml   # print the resolved config
"""


# --------------------------------------------------------------------------------- subcommands
def cmd_config(args: argparse.Namespace) -> int:
    from mmdiff.config import load_config, to_yaml

    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from mmdiff.config import load_config

    cfg = load_config(args.config, args.overrides)
    from mmdiff.training import fit

    run_dir = fit(cfg, resume=args.resume)
    log.info("done: checkpoints in %s", Path(run_dir) / "checkpoints")
    return 0


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise UsageError(f"--{name} must be a positive number, got {value}.")


def cmd_sample(args: argparse.Namespace) -> int:
    prompts: List[str] = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file '{path}' does not exist.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("no prompts given; pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    _positive("n", args.n)
    _positive("steps", args.steps)
    _positive("batch-size", args.batch_size)
    from mmdiff.api import load
    from mmdiff.sampling import write_samples

    system = load(args.ckpt, expect="text_to_image", use_ema=not args.no_ema, device=args.device)
    out = write_samples(
        system,
        prompts,
        n_per_prompt=args.n,
        out_dir=args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.cfg,
        eta=args.eta,
        temperature=args.temperature,
    )
    log.info("wrote %d images and %s", args.n * len(prompts), out / "grid.png")
    return 0


def cmd_shards_demo(args: argparse.Namespace) -> int:
    from mmdiff.data.writers import write_demo_shards

    written = write_demo_shards(args.out, image_size=args.image_size, seed=args.seed)
    for split, paths in written.items():
        log.info("%s: %d shards in %s", split, len(paths), args.out)
    return 0


def cmd_shards_folder(args: argparse.Namespace) -> int:
    from mmdiff.data.writers import write_folder_shards

    paths = write_folder_shards(
        args.src, args.out, manifest=args.manifest, shard_size=args.shard_size, prefix=args.prefix
    )
    log.info("wrote %d shards to %s", len(paths), args.out)
    return 0


def cmd_eval_digits(args: argparse.Namespace) -> int:
    _positive("n", args.n)
    from mmdiff.api import load
    from mmdiff.eval.digits import evaluate_digits

    system = load(args.ckpt, expect="text_to_image", use_ema=not args.no_ema, device=args.device)
    result = evaluate_digits(
        system,
        n_per_digit=args.n,
        seed=args.seed,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.cfg,
        out=args.out,
    )
    sys.stdout.write(result.summary() + "\n")
    return 0


# ------------------------------------------------------------------------------------- parser
def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the config's)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, euler, euler_karras, heun, dpmpp_2m, ...")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--no-ema", action="store_true", help="use raw weights even if EMA weights exist")


def build_parser() -> argparse.ArgumentParser:
    """The full ``mmdiff`` argument parser."""
    parser = argparse.ArgumentParser(
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
    p.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the config's)")
    p.add_argument("--temperature", type=float, default=None, help="noise temperature (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler call (default 64)")
    _sampling_options(p)
    p.set_defaults(func=cmd_sample)

    shards = sub.add_parser("shards", help="write webdataset shards").add_subparsers(
        dest="shards_command", metavar="KIND", required=True
    )
    p = shards.add_parser("demo", help="scikit-learn's digits as captioned image shards")
    p.add_argument("out", help="output folder")
    p.add_argument("--image-size", type=int, default=32, help="side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="caption/split seed (default 0)")
    p.set_defaults(func=cmd_shards_demo)
    p = shards.add_parser("folder", help="an image folder with .txt captions (or a manifest)")
    p.add_argument("src", help="image folder (ignored with --manifest, which lists paths)")
    p.add_argument("out", help="output folder")
    p.add_argument("--manifest", help="CSV (path,caption) or JSONL manifest instead of sidecars")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    p.set_defaults(func=cmd_shards_folder)

    evals = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(
        dest="eval_command", metavar="METRIC", required=True
    )
    p = evals.add_parser("digits", help="digit accuracy of text-to-image samples (independent SVC)")
    p.add_argument("ckpt", help="text_to_image checkpoint trained on the digits demo")
    p.add_argument("--n", type=int, default=20, help="samples per digit (default 20)")
    p.add_argument("--out", default=None, help="folder for a JSON report and sample grid")
    _sampling_options(p)
    p.set_defaults(func=cmd_eval_digits)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
