"""`make demo`: digits shards → VAE → CLIP → text-to-image → samples, digit accuracy, captioner.

The CLIP stage trains the tiny open_clip model contrastively on the digits, so the frozen text
encoder of the text-to-image stage carries meaning (a random-init one does not name digits).

Each stage is skipped when its output already exists (pass --force to redo everything), so an
interrupted demo continues where it stopped.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from mmdiff.config import load_config

log = logging.getLogger("demo")

DATA = Path("data/digits")
RUNS = Path("runs/demo")
STAGES = [
    ("vae", "configs/demo/vae.yaml"),
    ("clip", "configs/demo/clip.yaml"),
    ("t2i", "configs/demo/text_to_image.yaml"),
    ("caption_ar", "configs/demo/caption_ar.yaml"),
]


def _stage(name: str, config: str, force: bool) -> Path:
    from mmdiff.run.training import fit

    # Plain progress lines instead of a progress bar when the output goes to a file or CI log.
    cfg = load_config(config, [] if sys.stdout.isatty() else ["trainer.enable_progress_bar=false"])
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    if last.is_file() and not force:
        log.info("[%s] %s exists, skipping (use --force to retrain)", name, last)
        return last
    if force and Path(cfg.run_dir).exists():
        shutil.rmtree(cfg.run_dir)
    started = time.time()
    fit(cfg)
    log.info("[%s] trained in %.0f s", name, time.time() - started)
    return last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild shards and retrain every stage")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()

    from mmdiff.inference.api import load
    from mmdiff.inference.caption_files import evaluate_captioner
    from mmdiff.data.writers import write_demo_shards
    from mmdiff.eval.digit_judge import digit_prompt, evaluate_digits
    from mmdiff.inference.sample_files import write_samples

    if args.force or not any(DATA.glob("train-*.tar")):
        write_demo_shards(DATA, image_size=32, seed=0)
    checkpoints = {name: _stage(name, config, args.force) for name, config in STAGES}

    system = load(checkpoints["t2i"], expect="text_to_image")
    samples = write_samples(
        system, [digit_prompt(d) for d in range(10)], n_per_prompt=8, out_dir=RUNS / "samples", seed=0
    )
    result = evaluate_digits(system, n_per_digit=20, seed=1, out=RUNS / "eval")
    captioner = load(checkpoints["caption_ar"], expect="captioning")
    captions = evaluate_captioner(captioner, sorted(str(p) for p in DATA.glob("val-*.tar")))
    examples = "\n".join(f"    {ref!r:40} → {gen!r}" for ref, gen in captions["examples"][:5])
    wandb_dirs = sorted((RUNS / "t2i" / "wandb").glob("offline-run-*"))
    print(
        f"\nDemo finished in {time.time() - started:.0f} s.\n"
        f"  samples:        {samples}/grid.png (one row per digit prompt)\n"
        f"  {result.summary()}\n"
        f"  captioner on {captions['n']} val digits: digit accuracy {captions['digit_accuracy']:.3f}, "
        f"BLEU-4 {captions['bleu4']:.3f}; examples (reference → caption):\n{examples}\n"
        f"  training grids: {RUNS}/t2i/samples/ and {RUNS}/vae/samples/\n"
        f"  W&B (offline):  {wandb_dirs[-1] if wandb_dirs else RUNS / 't2i' / 'wandb'}\n"
        f"  publish with:   .venv/bin/wandb sync {wandb_dirs[-1] if wandb_dirs else '<run dir>'}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
