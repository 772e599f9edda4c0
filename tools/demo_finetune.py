"""`make demo-finetune` (after `make demo`): teach the demo's exported pipeline a new concept with LoRA.

Stages, each skipped when its output exists (--force redoes them):

1. export: `mmdiff export runs/demo/t2i/checkpoints/last.ckpt --out runs/demo/t2i_pipeline`, a
   diffusers StableDiffusionPipeline folder (the demo model reads only the CLIP token states);
2. shards: data/digits_upside_down/ — every 7 of the demo's train split turned 180° and captioned
   "a handwritten digit seven, upside down", each also upright as "a handwritten digit seven"
   (a contrast pair, as DreamBooth's class prompt: it tells the adapters that the new words, not
   "seven", carry the turn), mixed with ordinary digits under their own captions (1.5 per new
   sample by default) against forgetting; the val split gets the same treatment;
3. fine-tune: configs/demo/finetune_lora.yaml (`model.pretrained` = the pipeline folder,
   `model.lora`: adapters on the U-Net's attention projections);
4. judge, with the independent digit SVC (mmdiff.eval.digit_judge), the fine-tuned model with the
   adapters at scale 0 ("before": the pipeline's base weights exactly) and at scale 1 ("after"):
   the new concept's accuracy and the ten ordinary prompts' accuracy (forgetting).

The judge was trained on upright digits only, so it cannot recognise an upside-down 7 as such:
each sample of the new prompt is turned 180° back before judging, and counts as correct when the
judge then reads a 7. An upright 7 turned over does not read as 7, so the base model, which
draws an ordinary 7 for this prompt, scores low. The share of new-prompt samples the judge reads
as 7 *without* turning them ("upright_seven_rate") is reported beside it.

Writes runs/demo/finetune_eval/ (grids, metrics) and runs/demo/finetune_metrics.json, and prints
one summary line.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from mmdiff.config import load_config

log = logging.getLogger("demo-finetune")

RUNS = Path("runs/demo")
DEMO_DATA = Path("data/digits")
NEW_DATA = Path("data/digits_upside_down")
T2I_CKPT = RUNS / "t2i" / "checkpoints" / "last.ckpt"
PIPELINE = RUNS / "t2i_pipeline"
CONFIG = "configs/demo/finetune_lora.yaml"
OUT = RUNS / "finetune_eval"
METRICS = RUNS / "finetune_metrics.json"
NEW_DIGIT = 7
UPRIGHT_PROMPT = "a handwritten digit seven"  # the class prompt of the contrast pairs
NEW_PROMPT = f"{UPRIGHT_PROMPT}, upside down"


class DemoMissing(Exception):
    """An output of `make demo` this script needs is not there."""


# ----------------------------------------------------------------------------------- export
def export_pipeline(ckpt: Path, out: Path, force: bool) -> Path:
    """``mmdiff export CKPT --out OUT`` unless OUT already holds a complete pipeline folder."""
    from mmdiff.cli import main as mmdiff_main

    if (out / "model_index.json").is_file() and not force:
        log.info("[export] %s exists, skipping", out)
        return out
    if not ckpt.is_file():
        raise DemoMissing(f"{ckpt} is missing; run `make demo` first.")
    if out.exists():  # an interrupted or forced export: model_index.json is written last
        shutil.rmtree(out)
    code = mmdiff_main(["export", str(ckpt), "--out", str(out)])
    if code != 0:
        raise RuntimeError(f"`mmdiff export {ckpt} --out {out}` failed (exit code {code}).")
    if not (out / "model_index.json").is_file():
        # The export logs why; the usual reason is a demo trained before use_pooled_text: false.
        shutil.rmtree(out)
        raise DemoMissing(
            f"{ckpt} does not export as a StableDiffusionPipeline (see the log line above); retrain it with "
            "the current configs/demo/text_to_image.yaml: `rm -r runs/demo/t2i && make demo`.")
    return out


# ----------------------------------------------------------------------------------- shards
def _read_shard(path: Path) -> List[Dict[str, bytes]]:
    """The samples of one webdataset tar as ``{"__key__", ext: bytes}`` dicts, in file order."""
    samples: Dict[str, Dict[str, Any]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            f = tar.extractfile(member)
            assert f is not None
            samples.setdefault(key, {"__key__": key})[ext] = f.read()
    return list(samples.values())


def _rotated_png(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        turned = img.transpose(Image.Transpose.ROTATE_180)
    buf = io.BytesIO()
    turned.save(buf, format="PNG")
    return buf.getvalue()


def concept_samples(samples: List[Dict[str, bytes]], ordinary_per_new: float,
                    rng: np.random.Generator) -> Tuple[List[Dict[str, Any]], int]:
    """The new concept (every 7 turned 180°, :data:`NEW_PROMPT`), the same 7s upright under
    :data:`UPRIGHT_PROMPT` (contrast pairs), and ordinary digits.

    ``ordinary_per_new`` ordinary samples (any digit, upright, own caption) per new-concept one,
    drawn without replacement (all of them if there are fewer). Returns (shuffled samples, number
    new); the contrast pairs are as many as the new samples.
    """
    labels = [int(json.loads(s["json"])["label"]) for s in samples]
    new, pairs = [], []
    for s, label in zip(samples, labels):
        if label == NEW_DIGIT:
            meta = {**json.loads(s["json"]), "caption": NEW_PROMPT, "rotated": 180}
            new.append({"png": _rotated_png(s["png"]), "txt": NEW_PROMPT, "json": json.dumps(meta)})
            meta = {**json.loads(s["json"]), "caption": UPRIGHT_PROMPT, "rotated": 0}
            pairs.append({"png": s["png"], "txt": UPRIGHT_PROMPT, "json": json.dumps(meta)})
    n_ordinary = min(len(samples), int(round(ordinary_per_new * len(new))))
    ordinary = [{"png": samples[i]["png"], "txt": samples[i]["txt"], "json": samples[i]["json"]}
                for i in sorted(rng.choice(len(samples), n_ordinary, replace=False))]
    pool = new + pairs + ordinary
    mixed = [pool[i] for i in rng.permutation(len(pool))]
    return mixed, len(new)


def write_concept_shards(src: Path, out: Path, *, ordinary_per_new: float = 1.5, seed: int = 0,
                         force: bool = False) -> Dict[str, int]:
    """Write ``OUT/{train,val}-NNNNNN.tar`` from the demo's shards in ``src``; returns counts."""
    from mmdiff.data.writers import AtomicShardWriter
    from mmdiff.io.atomic import write_text_atomic

    summary = out / "concept.json"  # written last: its presence says both splits are complete
    if summary.is_file() and not force:
        log.info("[shards] %s exists, skipping", summary)
        return json.loads(summary.read_text())
    counts: Dict[str, int] = {}
    for index, split in enumerate(("train", "val")):
        shards = sorted(src.glob(f"{split}-*.tar"))
        if not shards:
            raise DemoMissing(f"no {split} shards in {src}; run `make demo` first.")
        samples = [s for path in shards for s in _read_shard(path)]
        mixed, n_new = concept_samples(samples, ordinary_per_new, np.random.default_rng([seed, index]))
        with AtomicShardWriter(out, split, maxcount=200) as writer:
            for i, sample in enumerate(mixed):
                writer.write({"__key__": f"{split}_{i:06d}", **sample})
        n_ordinary = len(mixed) - 2 * n_new
        counts[f"{split}_new"], counts[f"{split}_contrast"], counts[f"{split}_ordinary"] = n_new, n_new, n_ordinary
        log.info("[shards] %s: %d upside-down 7s, the same upright, %d ordinary digits in %d shard(s) in %s",
                 split, n_new, n_ordinary, len(writer.paths), out)
    write_text_atomic(summary, json.dumps({**counts, "prompt": NEW_PROMPT, "ordinary_per_new": ordinary_per_new,
                                           "seed": seed}, indent=2))
    return counts


# ---------------------------------------------------------------------------------- fine-tune
def finetune(config: str, overrides: List[str], force: bool) -> Path:
    """Train ``config`` (LoRA on the exported pipeline) unless its last checkpoint exists."""
    from mmdiff.run.training import fit

    cfg = load_config(config, overrides + ([] if sys.stdout.isatty() else ["trainer.enable_progress_bar=false"]))
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    if last.is_file() and not force:
        log.info("[fine-tune] %s exists, skipping (use --force to retrain)", last)
        return last
    if Path(cfg.run_dir).exists():
        shutil.rmtree(cfg.run_dir)
    fit(cfg)
    return last


# -------------------------------------------------------------------------------------- judge
def judge_new_concept(system: Any, n: int, seed: int, lora_scale: float,
                      out: Optional[Path] = None) -> Dict[str, float]:
    """New-prompt samples turned 180° back: the share the digit judge reads as 7 (see module doc)."""
    import torch

    from mmdiff.eval.digit_judge import classify_digits
    from mmdiff.eval.generative import generate
    from mmdiff.io.images import grid, save_png

    images = generate(system, [NEW_PROMPT], n, batch_size=100, seed=seed, lora_scale=lora_scale)
    turned_back = torch.rot90(images, 2, dims=(2, 3))
    if out is not None:
        save_png(grid(images, nrow=10), out)
    return {
        "accuracy": float((classify_digits(turned_back) == NEW_DIGIT).mean()),
        "upright_seven_rate": float((classify_digits(images) == NEW_DIGIT).mean()),
        "n": n,
    }


def evaluate(ckpt: Path, n_new: int, n_per_digit: int, seed: int) -> Dict[str, Any]:
    """Before (adapters at scale 0 = the pipeline's weights) and after (scale 1), new and old prompts."""
    from mmdiff.eval.digit_judge import evaluate_digits
    from mmdiff.inference.api import load

    system = load(ckpt, expect="text_to_image", device="cpu")
    result: Dict[str, Any] = {}
    for stage, scale in (("before", 0.0), ("after", 1.0)):
        t0 = time.time()
        new = judge_new_concept(system, n_new, seed, scale, OUT / f"new_concept_{stage}.png")
        old = evaluate_digits(system, n_per_digit=n_per_digit, seed=seed, out=OUT / f"old_prompts_{stage}",
                              lora_scale=scale)
        result[stage] = {"new_concept": new, "old_prompts": {"accuracy": old.accuracy, "per_digit": old.per_digit,
                                                             "n": 10 * n_per_digit},
                         "seconds": round(time.time() - t0, 1)}
        log.info("[judge] %s: new concept %.3f (upright 7s %.3f), old prompts %.3f", stage, new["accuracy"],
                 new["upright_seven_rate"], old.accuracy)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="redo the export, the shards and the fine-tune")
    parser.add_argument("--config", default=CONFIG, help=f"fine-tune config (default {CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set trainer.max_steps=100)")
    parser.add_argument("--ordinary-per-new", type=float, default=1.5,
                        help="ordinary digits per upside-down 7 in the shards (default 1.5)")
    parser.add_argument("--n-new", type=int, default=100, help="samples of the new prompt judged (default 100)")
    parser.add_argument("--n-per-digit", type=int, default=20, help="samples per ordinary prompt (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (default 1, as the demo's evaluation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()
    timings: Dict[str, float] = {}
    try:
        t0 = time.time()
        export_pipeline(T2I_CKPT, PIPELINE, args.force)
        timings["export"] = round(time.time() - t0, 1)
        t0 = time.time()
        counts = write_concept_shards(DEMO_DATA, NEW_DATA, ordinary_per_new=args.ordinary_per_new,
                                      force=args.force)
        timings["shards"] = round(time.time() - t0, 1)
    except DemoMissing as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    t0 = time.time()
    ckpt = finetune(args.config, args.overrides, args.force)
    timings["finetune"] = round(time.time() - t0, 1)
    t0 = time.time()
    result = evaluate(ckpt, args.n_new, args.n_per_digit, args.seed)
    timings["judge"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - started, 1)

    before, after = result["before"], result["after"]
    metrics = {"prompt": NEW_PROMPT, "checkpoint": str(ckpt), "pipeline": str(PIPELINE), "shards": counts,
               "seed": args.seed, **result, "timings_s": timings}
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    from mmdiff.io.atomic import write_text_atomic

    write_text_atomic(METRICS, json.dumps(metrics, indent=2))
    print(f"\nLoRA fine-tune of the exported demo pipeline on '{NEW_PROMPT}': new concept "
          f"{before['new_concept']['accuracy']:.3f} → {after['new_concept']['accuracy']:.3f} "
          f"(target ≥ 0.90), old prompts {before['old_prompts']['accuracy']:.3f} → "
          f"{after['old_prompts']['accuracy']:.3f} (target ≥ 0.95), {timings['total']:.0f} s "
          f"(fine-tune {timings['finetune']:.0f} s); grids in {OUT}/, metrics in {METRICS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
