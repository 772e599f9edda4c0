"""The ``mmdiff`` command: a thin argparse layer over mmdiff's Python API.

Every user error ends in one line on stderr and a non-zero exit code (2 for config and usage
errors), never a traceback. Heavy libraries are imported inside the subcommands so that
``mmdiff config`` and ``--help`` answer in well under a second.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from mmdiff.cli.arguments import (OneLineParser, add_overrides, add_picture_size, add_sampling_options,
                                  add_size_options, finite_float, non_negative_float, non_negative_int, output_folder,
                                  positive_float, positive_int, unit_fraction)
from mmdiff.cli.commands import (cmd_bench, cmd_caption, cmd_config, cmd_eval_digits, cmd_eval_images,
                                 cmd_eval_roundtrip, cmd_export, cmd_fit, cmd_interpolate, cmd_precompute,
                                 cmd_sample, cmd_shards_demo, cmd_shards_folder, cmd_sweep, cmd_sync, cmd_vary)
from mmdiff.errors import MmdiffError, UsageError

log = logging.getLogger("mmdiff")

EPILOG = """examples:
  mmdiff shards demo data/digits                  # digits → webdataset shards
  mmdiff fit configs/demo/vae.yaml                # train the demo VAE
  mmdiff fit configs/demo/text_to_image.yaml trainer.max_steps=100
  mmdiff sample runs/demo/t2i/checkpoints/last.ckpt --prompt "a handwritten digit seven" --n 8
  mmdiff sample CKPT --prompt "a handwritten digit seven" --width 48 --height 32   # any aspect
  mmdiff sample CKPT --prompt "a handwritten digit one" --init-image seven.png --strength 0.6 [--mask m.png]
  mmdiff config configs/demo/text_to_image.yaml   # print the resolved config
  mmdiff sweep configs/sweeps/t2i_grid.yaml configs/demo/text_to_image.yaml   # a job array's tasks
  mmdiff export runs/demo/t2i/checkpoints/last.ckpt --out export/t2i   # diffusers folder
  mmdiff export LORA_CKPT --lora export/lora            # adapters for pipeline.load_lora_weights
"""



def _unclip_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vary", help="unCLIP: variations of an image from its CLIP image embedding")
    p.add_argument("ckpt", help="text_to_image checkpoint trained with model.image_embed_conditioning")
    p.add_argument("image", help="image file")
    p.add_argument("--n", type=positive_int, default=8, help="variations (default 8)")
    p.add_argument("--prompt", default="", help="caption the decoder also sees (default: none)")
    p.add_argument("--out", type=output_folder, default="variations", help="output folder (default ./variations)")
    add_sampling_options(p)
    p.set_defaults(func=cmd_vary)
    p = sub.add_parser("interpolate", help="unCLIP: decode a slerp between two images' CLIP embeddings")
    p.add_argument("ckpt", help="text_to_image checkpoint trained with model.image_embed_conditioning")
    p.add_argument("image_a", help="first image file")
    p.add_argument("image_b", help="last image file")
    p.add_argument("--n", type=positive_int, default=8, help="frames, both ends included (default 8)")
    p.add_argument("--prompt", default="", help="caption the decoder also sees (default: none)")
    p.add_argument("--out", type=output_folder, default="interpolation", help="output folder (default ./interpolation)")
    add_sampling_options(p)
    p.set_defaults(func=cmd_interpolate)


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
        add_sampling_options(p)
        p.set_defaults(func=cmd_eval_images)

    p = sub.add_parser("export", help="write a text-to-image checkpoint as a diffusers/open_clip folder")
    p.add_argument("ckpt", help="text_to_image checkpoint (.ckpt)")
    p.add_argument("--out", default=None,
                   help="output folder (or .safetensors file with --format safetensors); a LoRA model's adapters "
                        "are merged into the weights")
    p.add_argument("--lora", metavar="OUT", default=None,
                   help="write a LoRA model's adapters to OUT/pytorch_lora_weights.safetensors "
                        "(diffusers' load_lora_weights reads it)")
    p.add_argument("--format", choices=["diffusers", "safetensors"], default="diffusers",
                   help="diffusers folder (default) or one .safetensors file")
    p.add_argument("--metrics", action="append", metavar="JSON", help="metrics JSON for the model card (repeatable)")
    p.add_argument("--no-ema", action="store_true", help="export raw weights even if EMA weights exist")
    p.set_defaults(func=cmd_export)


def _fit_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``mmdiff fit``; ``mmdiff sync`` takes the same, so train.sbatch passes one list to both."""
    p.add_argument("config", help="experiment YAML file")
    add_overrides(p, "data.batch_size=16")
    p.add_argument("--resume", metavar="CKPT",
                   help="'last' or a .ckpt path (default: the run dir's newest complete checkpoint, if any)")
    p.add_argument("--fresh", action="store_true",
                   help="start at step 0 over an existing run, moving its files to RUN_DIR/superseded/")


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
    add_overrides(p, "trainer.max_steps=100")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("fit", help="train the system a config describes")
    _fit_arguments(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("sweep", help="list a sweep file's tasks (a job array's override sets), or print one")
    p.add_argument("sweep", help="sweep YAML file (grid: or list:, and name:)")
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML file: check every task against it and add each task's run_dir and W&B group")
    add_overrides(p, "trainer.max_steps=1000 (with CONFIG)")
    p.add_argument("--task", type=non_negative_int, default=None, metavar="I",
                   help="print task I's overrides, one per line (what slurm/sweep.sbatch passes to mmdiff fit)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sync", help="upload a run's offline W&B folders with `wandb sync` (takes fit's arguments)")
    _fit_arguments(p)
    p.set_defaults(func=cmd_sync)

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
    p.add_argument("--lora-scale", type=finite_float, default=None, metavar="S",
                   help="multiply a LoRA model's adapters by S (0 = the base model; default 1)")
    add_sampling_options(p)
    add_picture_size(p)
    add_size_options(p)
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
    p.add_argument("--layout", choices=("mmdiff", "img2dataset"), default="mmdiff",
                   help="mmdiff: PREFIX-NNNNNN.tar; img2dataset: NNNNN.tar with NNNNN_stats.json (and "
                        "NNNNN.parquet when pyarrow is installed), as img2dataset writes them (default mmdiff)")
    p.set_defaults(func=cmd_shards_folder)

    evals = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(
        dest="eval_command", metavar="METRIC", required=True
    )
    p = evals.add_parser("digits", help="digit accuracy of text-to-image samples (independent SVC)")
    p.add_argument("ckpt", help="text_to_image checkpoint trained on the digits demo")
    p.add_argument("--n", type=positive_int, default=20, help="samples per digit (default 20)")
    p.add_argument("--out", type=output_folder, default=None, help="folder for a JSON report and sample grid")
    add_sampling_options(p)
    p.set_defaults(func=cmd_eval_digits)
    p = evals.add_parser("roundtrip", help="text → image → caption: does the caption name the prompted digit?")
    p.add_argument("t2i_ckpt", help="text_to_image checkpoint trained on the digits demo")
    p.add_argument("caption_ckpt", help="captioning checkpoint")
    p.add_argument("--n", type=positive_int, default=10, help="samples per digit (default 10)")
    p.add_argument("--out", type=output_folder, default=None, help="folder for a JSON report and sample grid")
    p.add_argument("--decoding", choices=["greedy", "beam", "topk", "topp"], default=None,
                   help="caption decoding (default: the config's)")
    p.add_argument("--caption-steps", type=positive_int, default=None, help="masked caption head steps")
    add_sampling_options(p)
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
    add_overrides(p, "model.precompute_dtype=fp32")
    p.add_argument("--out", type=output_folder, required=True, help="output folder for the precomputed shards")
    p.add_argument("--split", action="append", choices=["train", "val"], help="only this split (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="encoder batch (default data.val_batch_size)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: this rank's GPU)")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing output shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("bench", help="measure training, loader, FLOPs, memory and sampling speed of a config")
    p.add_argument("config", help="text_to_image experiment YAML file")
    add_overrides(p, "trainer.precision=bf16-mixed")
    p.add_argument("--steps", type=positive_int, default=20, help="timed training steps per run (default 20)")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--rounds", type=positive_int, default=2, help="rounds: one fit per row, (a) and (b) interleaved (default 2)")
    p.add_argument("--block", type=positive_int, default=2,
                   help="steps of (a), then of (b), per interleaved pair (default 2)")
    p.add_argument("--only", default=None, help="comma list of sections: train,fit,loader,flops,sampling "
                                                "(the default set) and ddp_callbacks (2-rank DDP, callbacks on/off)")
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
