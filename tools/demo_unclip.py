"""`make demo-unclip`: the unCLIP stage of the digits demo (after `make demo`).

Trains the prior (configs/demo/prior.yaml) and fine-tunes the demo text-to-image model into an
image-embedding decoder (configs/demo/unclip_decoder.yaml), then measures on the digits:

- two-stage text → image digit accuracy (prior → decoder, judged by the independent SVC);
- variations of one validation image per digit: judged accuracy, and mean pixel distance to the
  source against the "copy" threshold (2× the VAE round-trip distance of the same sources);
- mean cosine to the true CLIP image embedding of each validation image: the prior's sampled
  embedding for its caption vs the caption's text embedding;

and writes grids (two-stage samples, variations, an interpolation) and report.json to
runs/demo/unclip_eval/. Stages whose checkpoint exists are skipped (--force retrains them).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from mmdiff.config import load_config

log = logging.getLogger("demo-unclip")

RUNS = Path("runs/demo")
NEEDED = ("vae", "clip", "t2i")
STAGES = [("unclip_prior", "configs/demo/prior.yaml"), ("unclip_decoder", "configs/demo/unclip_decoder.yaml")]
OUT = RUNS / "unclip_eval"


def _train(name: str, config: str, force: bool) -> Path:
    from mmdiff.run.training import fit

    cfg = load_config(config, [] if sys.stdout.isatty() else ["trainer.enable_progress_bar=false"])
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    if last.is_file() and not force:
        log.info("[%s] %s exists, skipping (use --force to retrain)", name, last)
        return last
    if Path(cfg.run_dir).exists():
        shutil.rmtree(cfg.run_dir)
    fit(cfg)
    return last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="retrain the prior and the decoder")
    parser.add_argument("--n-per-digit", type=int, default=20, help="two-stage samples per digit (default 20)")
    parser.add_argument("--variations", type=int, default=8, help="variations per source image (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    missing = [n for n in NEEDED if not (RUNS / n / "checkpoints" / "last.ckpt").is_file()]
    if missing:
        sys.stderr.write(f"error: the demo's {', '.join(missing)} checkpoint(s) are missing under {RUNS}; "
                         "run `make demo` first.\n")
        return 2
    torch.manual_seed(args.seed)
    timings = {}
    started = time.time()
    checkpoints = {}
    for name, config in STAGES:
        t0 = time.time()
        checkpoints[name] = _train(name, config, args.force)
        timings[f"train_{name}"] = round(time.time() - t0, 1)

    from mmdiff.inference.api import load
    from mmdiff.eval.digit_judge import evaluate_digits
    from mmdiff.eval.unclip_metrics import mean_pixel_distance, read_shards, variation_scores
    from mmdiff.io.images import grid, save_png
    from mmdiff.inference.unclip import TwoStage, interpolate, load_decoder, vary

    prior = load(checkpoints["unclip_prior"], expect="prior")
    decoder = load_decoder(checkpoints["unclip_decoder"])
    size = int(decoder.cfg.data.image_size)
    images, captions, labels = read_shards(sorted(str(p) for p in Path("data/digits").glob("val-*.tar")), size)

    t0 = time.time()
    two_stage = evaluate_digits(TwoStage(prior, decoder), n_per_digit=args.n_per_digit, seed=args.seed,
                                out=OUT / "two_stage")
    timings["two_stage"] = round(time.time() - t0, 1)

    t0 = time.time()
    sources = [labels.index(d) for d in range(10)]
    src = images[sources]
    variations = variation_scores(lambda im, n, s: vary(decoder, im, n, seed=s), src, list(range(10)),
                                  args.variations, seed=args.seed)
    with torch.no_grad():
        copies = decoder.decode_latents(decoder.encode_images(src, sample=False)).cpu()
    floor = float(mean_pixel_distance(copies, src).mean())
    save_png(grid(variations.pop("grid"), nrow=args.variations + 1), OUT / "variations.png")
    timings["variations"] = round(time.time() - t0, 1)

    t0 = time.time()
    cos = {"prior": [], "text": []}
    for start in range(0, len(captions), 100):
        part = prior.embedding_cosines(images[start : start + 100], captions[start : start + 100], seed=args.seed + start)
        for key in cos:
            cos[key].append(part[key].cpu())
    cosines = {key: float(torch.cat(v).mean()) for key, v in cos.items()}
    timings["cosines"] = round(time.time() - t0, 1)

    frames = interpolate(decoder, images[sources[3]], images[sources[8]], 8, seed=args.seed)
    save_png(grid(frames, nrow=8), OUT / "interpolation_3_to_8.png")
    timings["total"] = round(time.time() - started, 1)

    report = {
        "two_stage_accuracy": two_stage.accuracy, "two_stage_per_digit": two_stage.per_digit,
        "two_stage_samples": 10 * args.n_per_digit, "seed": args.seed,
        "variation_accuracy": variations["accuracy"], "variation_samples": variations["n"],
        "variation_distance": variations["distance"], "copy_distance": floor, "copy_threshold": 2 * floor,
        "cosine_prior_to_image": cosines["prior"], "cosine_text_to_image": cosines["text"],
        "val_images": len(captions), "timings_s": timings,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"\nunCLIP demo finished in {timings['total']:.0f} s (report: {OUT / 'report.json'}).\n"
        f"  two-stage {two_stage.summary()}\n"
        f"  variations: digit accuracy {variations['accuracy']:.3f} over {variations['n']} "
        f"(10 sources × {args.variations}); mean pixel distance to the source {variations['distance']:.3f} "
        f"(a copy: VAE round trip {floor:.3f}, threshold 2× = {2 * floor:.3f})\n"
        f"  CLIP image embedding of {len(captions)} val images, mean cosine: prior {cosines['prior']:.3f} "
        f"vs caption text {cosines['text']:.3f}\n"
        f"  grids: {OUT}/two_stage/digits_grid.png, {OUT}/variations.png, {OUT}/interpolation_3_to_8.png\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
