"""The bench result as a plain-text table and as a JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from mmdiff.io.atomic import write_text_atomic


def _si(x: Optional[float], unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def format_table(result: Dict[str, Any]) -> str:
    """The result as a plain-text table."""
    env, c = result["environment"], result["config"]
    lines = [
        f"mmdiff bench: {c['name']} on {env.get('device_name', env['device'])} "
        f"(torch {env['torch']}, {env['threads']} threads), batch {c['batch_size']}, "
        f"{c['image_size']} px → latents {c.get('latent_shape')}, precision {c['precision']}",
        f"load average: start {result.get('load_average_start')}, end {result.get('load_average_end')}",
        f"U-Net {c.get('unet_params', 0) / 1e6:.2f} M params, attention {c.get('attention_processors')}, "
        f"switches {c.get('speed_switches')}",
    ]
    tr = result.get("train")
    if tr:
        lines += ["", f"training step ({tr.get('rounds')} round(s) × {tr.get('pairs_per_round')} pairs of "
                      f"{tr.get('block')} steps, (a) and (b) interleaved)",
                  f"{'':<28}{'step ms':>10}{'IQR ms':>16}{'img/s':>10}{'CPU ms':>10}"]
        for mode in ("online", "precomputed"):
            row = tr[mode]
            for kind, label in (("framework", "(a) framework"), ("plain", "(b) plain loop")):
                r = row[kind]
                sp = r.get("spread", {})
                iqr = f"{1000 * sp['q1']:.1f}–{1000 * sp['q3']:.1f}" if sp else "-"
                lines.append(f"{mode + ' ' + label:<28}{1000 * r['step_s']:>10.1f}{iqr:>16}"
                             f"{r['images_per_s']:>10.1f}{1000 * r['step_cpu_s']:>10.1f}")
            q = row.get("ratio", {})
            rounds = ", ".join(f"{x:.3f}" for x in q.get("by_round", []))
            lines.append(f"  {mode} (a)/(b) {row['overhead']:.3f} (IQR {q.get('q1', float('nan')):.3f}–"
                         f"{q.get('q3', float('nan')):.3f} over {q.get('n', 0)} pairs; rounds {rounds}; "
                         f"CPU time {row['overhead_cpu']:.3f})")
            if "verdict" in row:
                lines.append(f"  → {row['verdict']['text']}")
        by_round = ", ".join(f"{x:.2f}" for x in tr.get("precomputed_speedup_by_round", []))
        lines.append(f"precomputed speed-up (a): {tr['precomputed_speedup']:.2f}× wall clock (rounds {by_round}), "
                     f"{tr['precomputed_speedup_cpu']:.2f}× CPU time")
    lines += _ddp_callbacks_lines(result.get("ddp_callbacks"))
    ft = result.get("fit")
    if ft and "error" in ft:
        lines += ["", f"fit with the data module: skipped ({ft['error']})"]
    elif ft:
        lines += ["", f"fit with the data module ({ft['num_workers']} workers alongside):"]
        for mode in ("online", "precomputed"):
            if mode in ft:
                r = ft[mode]
                lines.append(f"  {mode:<26}{1000 * r['step_s']:>10.1f}{r['images_per_s']:>10.1f}"
                             f"{'':>10}{1000 * r['step_cpu_s']:>10.1f}")
        if "precomputed_speedup" in ft:
            lines.append(f"  precomputed speed-up: {ft['precomputed_speedup']:.2f}× wall clock, "
                         f"{ft['precomputed_speedup_cpu']:.2f}× CPU time of the training process")
    ld = result.get("loader")
    if ld and "error" in ld:
        lines += ["", f"data loader: skipped ({ld['error']})"]
    elif ld:
        lines += ["", "data loader alone:"]
        for r in ld["by_workers"].values():
            lines.append(f"  {r['workers']} worker(s): {r['images_per_s']:.0f} img/s")
        for r in ld.get("precomputed_by_workers", {}).values():
            lines.append(f"  {r['workers']} worker(s), precomputed shards: {r['images_per_s']:.0f} img/s")
        lines += _bucket_lines(ld.get("buckets"))
        if "consumed_online_images_per_s" in ld:
            lines.append(f"  training consumes {ld['consumed_online_images_per_s']:.0f} img/s online, "
                         f"{ld['consumed_precomputed_images_per_s']:.0f} img/s precomputed; "
                         f"headroom {ld['headroom_online']:.1f}× (online)")
    f = result.get("flops")
    if f:
        lines += ["", "FLOPs per image: U-Net train step " + _si(f["unet_train_per_image"], "FLOP")
                  + ", U-Net call " + _si(f["unet_forward_per_image"], "FLOP")
                  + ", VAE encode " + _si(f["vae_encode_per_image"], "FLOP")
                  + ", text encode " + _si(f["text_encode_per_image"], "FLOP")]
        if "achieved_tflops" in f:
            a = f["achieved_tflops"]
            mfu = f.get("mfu")
            lines.append(f"achieved: {a['online'] * 1e3:.1f} GFLOP/s online, {a['precomputed'] * 1e3:.1f} "
                         f"GFLOP/s precomputed" + (f"; MFU {100 * mfu['online']:.1f}% / "
                                                    f"{100 * mfu['precomputed']:.1f}% of "
                                                    f"{f['peak_bf16_tflops']:.0f} TFLOP/s bf16" if mfu else
                                                    " (MFU: no bf16 peak known for this device)"))
    s = result.get("sampling")
    if s:
        lines += ["", f"sampling: {s['sampler']}, {s['steps']} steps, guidance {s['guidance_scale']} "
                      f"(U-Net batch = {s['unet_batch']})"]
        for r in s["by_batch"].values():
            lines.append(f"  batch {r['batch_size']:>3}: {r['s_per_image']:.3f} s/image, "
                         f"{r['ms_per_unet_call']:.1f} ms per U-Net call ({r['unet_calls']} calls, "
                         f"{100 * r['unet_share']:.0f}% of the time in the U-Net)")
    m = result.get("memory", {})
    lines += ["", "memory: peak CPU RSS " + f"{m.get('cpu_peak_rss_mb', 0):.0f} MiB"
              + "".join(f", {k} {v:.0f} MiB" for k, v in m.items() if k != "cpu_peak_rss_mb")]
    if result.get("targets"):
        lines.append("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return "\n".join(lines)


def _bucket_lines(b: Optional[Dict[str, Any]]) -> List[str]:
    """The loader's square-vs-buckets lines (none when it did not run)."""
    if not b:
        return []
    if "error" in b:
        return [f"  with buckets: skipped ({b['error']})"]
    q, sq, bk = b["ratio"], b["square"], b["buckets"]
    sizes = ", ".join(f"{w}x{h}" for w, h in bk["sizes"])
    shapes = ", ".join(f"{k} ×{v}" for k, v in bk["batches_by_shape"].items())
    return [f"  0 workers, interleaved in blocks of {b['block']}: square {sq['images_per_s']:.0f} img/s, "
            f"buckets {bk['images_per_s']:.0f} img/s (buckets {sizes}; batches {shapes})",
            f"  buckets/square {b['throughput_ratio']:.3f} (IQR {q['q1']:.3f}–{q['q3']:.3f} over {q['n']} pairs)"]


def _ddp_callbacks_lines(dc: Optional[Dict[str, Any]]) -> List[str]:
    """The ``ddp_callbacks`` section's lines (none when it did not run)."""
    if not dc:
        return []
    if "error" in dc:
        return ["", f"DDP callbacks on/off: skipped ({dc['error']})"]
    lines = ["", f"DDP step, mmdiff's callbacks on vs off ({dc['world_size']} ranks, {dc['backend']}, "
                 f"{dc['threads_per_rank']} thread(s) each, batch {dc['batch_size_per_rank']} per rank, "
                 f"{dc['mode']}; {dc['rounds']} round(s) × {dc['pairs_per_round']} pairs of {dc['block']} steps)",
             f"{'':<28}{'step ms':>10}{'IQR ms':>16}{'img/s':>10}{'CPU ms':>10}"]
    for side in ("on", "off"):
        r = dc[side]
        iqr = f"{1000 * r['spread']['q1']:.1f}–{1000 * r['spread']['q3']:.1f}"
        lines.append(f"{'callbacks ' + side:<28}{1000 * r['step_s']:>10.1f}{iqr:>16}"
                     f"{r['images_per_s']:>10.1f}{1000 * r['step_cpu_s']:>10.1f}")
    q = dc["ratio"]
    rounds = ", ".join(f"{x:.3f}" for x in q["by_round"])
    lines += [f"  on/off {dc['overhead']:.3f} (IQR {q['q1']:.3f}–{q['q3']:.3f} over {q['n']} pairs; rounds {rounds}; "
              f"CPU time {dc['overhead_cpu']:.3f})",
              f"  → {dc['verdict']['text']}",
              f"  callbacks: {', '.join(dc['callbacks'])}"]
    return lines


def write_json(result: Dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` to ``path`` as JSON (atomically); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1, default=str) + "\n")
    return path
