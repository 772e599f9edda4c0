"""`make demo`: digits shards → VAE → CLIP → text-to-image → samples, digit accuracy, captioner.

The CLIP stage trains the tiny open_clip model contrastively on the digits, so the frozen text
encoder of the text-to-image stage carries meaning (a random-init one does not name digits).

Each stage is skipped when its output already exists (pass --force to redo everything), so an
interrupted demo continues where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Dict, List, Tuple

from demo_stages import Stage, fit_command, run_stages
from mmdiff.config import load_config

log = logging.getLogger("demo")

DATA = Path("data/digits")
RUNS = Path("runs/demo")
LATENTS = RUNS / "latents"
T2I = "configs/demo/text_to_image.yaml"
# (name, config, the stages whose output it reads); "latents" (VAE latents and CLIP text states of
# the shards, encoded once by `mmdiff precompute`) sits between the encoders and the U-Net.
FITS = [
    ("vae", "configs/demo/vae.yaml", ()),
    ("clip", "configs/demo/clip.yaml", ()),
    ("t2i", T2I, ("latents",)),
    ("caption_ar", "configs/demo/caption_ar.yaml", ("clip",)),
]


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the data-loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def _timed(times: dict[str, tuple[float, float]], name: str) -> Iterator[None]:
    """Record the wall and CPU seconds of one demo stage under ``name``."""
    wall, cpu = time.time(), _cpu_seconds()
    yield
    times[name] = (time.time() - wall, _cpu_seconds() - cpu)
    log.info("[%s] %.0f s wall, %.0f s CPU", name, *times[name])


def _stages(force: bool) -> Tuple[Dict[str, Path], List[Stage]]:
    """Each stage's output, and the stages to run: those whose output is missing (all with --force)."""
    from mmdiff.data.precomputed import FRAGMENT
    from mmdiff.jobs.precompute import fragment_overrides

    # Plain progress lines: the stages share one terminal, where progress bars would overwrite each other.
    quiet = ["trainer.enable_progress_bar=false"]
    latents = fragment_overrides(LATENTS, load_config(T2I).model.precompute_latents, ["train", "val"])
    plan = [("latents", LATENTS / FRAGMENT, LATENTS, ("vae", "clip"),
             [sys.executable, "-m", "mmdiff.cli", "precompute", T2I, "--out", str(LATENTS), "--no-progress",
              "--overwrite"])]  # an interrupted precompute leaves shards behind
    for name, config, needs in FITS:
        run_dir = Path(load_config(config).run_dir)
        command = fit_command(config, quiet + (latents if name == "t2i" else []))
        plan.append((name, run_dir / "checkpoints" / "last.ckpt", run_dir, needs, command))
    outputs: Dict[str, Path] = {}
    todo: List[Stage] = []
    for name, output, folder, needs, command in plan:
        outputs[name] = output
        if output.is_file() and not force:
            log.info("[%s] %s exists, skipping (use --force to redo)", name, output)
            continue
        if force and folder.exists():
            shutil.rmtree(folder)
        todo.append(Stage(name, command, needs, log_file=RUNS / f"{name}.log"))
    for stage in todo:  # a skipped stage's output is already there
        stage.needs = tuple(n for n in stage.needs if any(t.name == n for t in todo))
    return outputs, todo


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

    times: dict[str, tuple[float, float]] = {}
    with _timed(times, "shards"):
        if args.force or not any(DATA.glob("train-*.tar")):
            write_demo_shards(DATA, image_size=32, seed=0)
    checkpoints, todo = _stages(args.force)
    cpus = len(os.sched_getaffinity(0))
    parallel = min(2, cpus)
    RUNS.mkdir(parents=True, exist_ok=True)
    for name, t in run_stages(todo, parallel=parallel, threads=max(1, cpus // parallel)).items():
        times[name] = (t.wall, t.cpu)

    with _timed(times, "samples+judge"):
        system = load(checkpoints["t2i"], expect="text_to_image")
        samples = write_samples(
            system, [digit_prompt(d) for d in range(10)], n_per_prompt=8, out_dir=RUNS / "samples", seed=0
        )
        result = evaluate_digits(system, n_per_digit=20, seed=1, out=RUNS / "eval")
    with _timed(times, "caption eval"):
        captioner = load(checkpoints["caption_ar"], expect="captioning")
        captions = evaluate_captioner(captioner, sorted(str(p) for p in DATA.glob("val-*.tar")))
    stage_lines = "\n".join(f"    {name:14} {wall:6.0f} s wall {cpu:6.0f} s CPU" for name, (wall, cpu) in times.items())
    examples = "\n".join(f"    {ref!r:40} → {gen!r}" for ref, gen in captions["examples"][:5])
    wandb_dirs = sorted((RUNS / "t2i" / "wandb").glob("offline-run-*"))
    print(
        f"\nDemo finished in {time.time() - started:.0f} s ({_cpu_seconds():.0f} s CPU); per stage:\n"
        f"{stage_lines}\n"
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
