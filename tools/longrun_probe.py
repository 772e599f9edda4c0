"""Long-run health probe: train the toy demo pipeline for many steps and check memory and fds.

    python tools/longrun_probe.py --out runs/longrun [--steps 2000] [--warmup 500] [key=value ...]

Writes 16×16 digit shards under OUT/shards (unless ``--shards`` names existing ones), trains
``configs/demo/longrun.yaml`` (validation, checkpoints, previews, EMA and offline W&B on, the
resource probe sampling every ``trainer.probe_resources_every_n_steps``) into OUT/run, then writes
OUT/summary.json (see :func:`mmdiff.callbacks.resources.summarize`) and prints it. Exit code 0
when, after warm-up, total RSS (main process + data-loader workers) grew by at most
``--max-rss-growth`` percent and the open file descriptors of the last third of the run exceed
those of the first third after warm-up by at most ``--max-fd-increase`` (``fds_trend``); else 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo" / "longrun.yaml"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for shards, the run and summary.json")
    p.add_argument("--shards", default=None, help="existing demo shards (train-*.tar, val-*.tar)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: a quarter)")
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="percent")
    p.add_argument("--max-fd-increase", type=int, default=0, help="allowed fds_trend")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mmdiff.callbacks.resources import read_rows, summarize
    from mmdiff.config import load_config
    from mmdiff.data.writers import write_demo_shards
    from mmdiff.run.training import fit

    out = Path(args.out)
    shards = Path(args.shards) if args.shards else out / "shards"
    if not args.shards and not any(shards.glob("train-*.tar")):
        write_demo_shards(shards, image_size=16, seed=0)
    cfg = load_config(CONFIG, [
        f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
        f"run_dir={out / 'run'}", f"trainer.max_steps={args.steps}", *args.overrides,
    ])
    run_dir = fit(cfg, fresh=True)  # a measurement of its own: an earlier run in --out moves aside
    warmup = args.warmup if args.warmup is not None else args.steps // 4
    summary = summarize(read_rows(run_dir / "resources.csv"), warmup)
    ok = (summary["rss_total_growth_pct"] <= args.max_rss_growth
          and summary["fds_trend"] <= args.max_fd_increase)
    summary.update({"steps": args.steps, "max_rss_growth_pct": args.max_rss_growth,
                    "max_fd_increase": args.max_fd_increase, "ok": ok})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
