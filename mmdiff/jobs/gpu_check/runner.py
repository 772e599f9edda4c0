"""The GPU check's runner: one subprocess per section under a hard deadline, the JSON after
every section, the table, and ``main``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mmdiff.io.atomic import write_text_atomic
from mmdiff.jobs.gpu_check.sections import (DEADLINE_S, DEFAULT_PEAK_TFLOPS, NO_GPU, REPO, SECTIONS,
                                            run_section)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- driver
def _write(result: Dict[str, Any], path: Path) -> None:
    write_text_atomic(path, json.dumps(result, indent=1, default=str) + "\n")


def _child_env(name: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("WANDB_MODE", "offline")
    if name == "resume":  # deterministic cuBLAS: must be set before CUDA starts
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return env


def _unblock_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _spawn(name: str, dry_run: bool, params: Dict[str, Any], budget: float, workdir: Path) -> Dict[str, Any]:
    """Run one section in a subprocess under ``budget`` seconds; its entry, or an error entry."""
    out = workdir / f"{name}.json"
    logfile = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "mmdiff.jobs.gpu_check", "--section", name, "--section-out", str(out),
           "--params", json.dumps(params)] + (["--dry-run"] if dry_run else [])
    start = time.perf_counter()
    with open(logfile, "w") as logf:
        proc: Optional[subprocess.Popen] = None
        try:
            # SIGTERM waits until ``proc`` exists, so the ``finally`` can always kill the section.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                proc = subprocess.Popen(cmd, env=_child_env(name), stdout=logf, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_unblock_sigterm)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {budget:.0f} s", "seconds": budget,
                    "log_tail": _tail(logfile)}
        finally:  # the section runs in its own session: nothing else would stop it
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if out.is_file():
        entry = json.loads(out.read_text())
    else:
        entry = {"status": "error", "error": f"the section's process exited with code {proc.returncode} "
                                             "and wrote no result", "log_tail": _tail(logfile)}
    entry["wall_s"] = time.perf_counter() - start
    return entry


def _tail(path: Path, n: int = 15) -> List[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _run_one(result: Dict[str, Any], name: str, dry_run: bool, left: float, scale: float,
             peak_tflops: Optional[float], workdir: Path) -> None:
    if left < 5:
        result["sections"][name] = {"status": "error", "error": "not run: the script's deadline passed"}
        return
    params: Dict[str, Any] = {"peak_tflops": peak_tflops}
    eager = result["sections"].get("sd_unet_eager", {})
    if name == "sd_unet_regional" and eager.get("status") == "ok":
        params["batch"] = eager["batch"]
    budget = min(SECTIONS[name] * scale, left)
    log.info("gpu check: %s (budget %.0f s)", name, budget)
    result["sections"][name] = _spawn(name, dry_run, params, budget, workdir)


def run_all(out: Path, *, dry_run: bool, sections: Sequence[str], deadline_s: float,
            peak_tflops: Optional[float] = None) -> Dict[str, Any]:
    """Run ``sections`` one subprocess each, rewriting ``out`` after each; return the result."""
    started = time.monotonic()
    result: Dict[str, Any] = {"dry_run": dry_run, "deadline_s": deadline_s,
                              "sections": {name: {"status": "pending"} for name in sections}}
    out.parent.mkdir(parents=True, exist_ok=True)
    scale = 1.0 if not dry_run else 4.0  # a loaded CPU starts a torch process slowly
    try:
        _write(result, out)
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            for name in sections:
                _run_one(result, name, dry_run, deadline_s - (time.monotonic() - started), scale,
                         peak_tflops, Path(tmp))
                _write(result, out)
    except BaseException as err:  # SIGTERM / Ctrl-C: say where the run stopped, then stop
        for entry in result["sections"].values():
            if entry.get("status") == "pending":
                entry.update(status="error",
                             error=f"the script was interrupted ({type(err).__name__}) before this section finished")
        _write(result, out)
        raise
    result["seconds"] = time.monotonic() - started
    result["table"] = format_table(result).splitlines()
    _write(result, out)
    return result


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: Dict[str, Any]) -> str:
    """A short plain-text table of the result."""
    s = result["sections"]
    lines = [f"mmdiff GPU check{' (dry run, CPU, toy sizes)' if result.get('dry_run') else ''}"]
    for name, e in s.items():
        status = e.get("status")
        if status != "ok":
            lines.append(f"{name:<18}{status}: {e.get('reason') or e.get('error', '')}")
            continue
        if name == "demo":
            for prec in ("32-true", "bf16-mixed"):
                r = e[prec]
                lines.append(f"{'demo ' + prec:<18}(a) {r['online_framework_steps_per_s']:.1f} steps/s online, "
                             f"{r['precomputed_framework_steps_per_s']:.1f} precomputed; (a)/(b) "
                             f"{r['overhead_online']:.3f} / {r['overhead_precomputed']:.3f}")
        elif name.startswith("sd_unet"):
            mfu = e.get("mfu")
            lines.append(f"{name:<18}{e['unet_params_m']} M params, batch {e['batch']}: "
                         f"{e['images_per_s']:.1f} img/s, MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}, "
                         f"peak {_fmt(e.get('peak_memory_mb'), '.0f')} MiB")
        elif name == "sampling":
            lines.append(f"{name:<18}" + ", ".join(f"batch {k}: {v['s_per_image']:.3f} s/image"
                                                   for k, v in e["by_batch"].items()))
        elif name == "resume":
            lines.append(f"{name:<18}max |loss diff| steps 11-20: {e['max_abs_loss_diff_steps_11_20']:.2e}"
                         f" ({'exact' if e['exact'] else 'not bitwise'})")
        else:
            lines.append(f"{name:<18}ok")
    return "\n".join(lines)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tools/gpu_check.sh`` (and of each section's subprocess)."""
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="gpu_check.json", help="the JSON to write")
    p.add_argument("--dry-run", action="store_true", help="every section at toy size on the CPU")
    p.add_argument("--only", default=None, help="comma-separated sections (default: all)")
    p.add_argument("--deadline", type=float, default=None, help=f"seconds for the whole run (default {DEADLINE_S})")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"dense bf16 peak for MFU (default: by device name, else {DEFAULT_PEAK_TFLOPS:g})")
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--section-out", help=argparse.SUPPRESS)
    p.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.section:  # one section, in its own process
        entry = run_section(args.section, args.dry_run, json.loads(args.params))
        _write(entry, Path(args.section_out))
        return 0
    sections = list(SECTIONS) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        sys.stderr.write(f"gpu_check: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}.\n")
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.stderr.write(f"gpu_check: {NO_GPU}\n")
            return 2
    # SIGTERM (a job's time limit, `timeout`) unwinds like Ctrl-C: the running section is killed
    # and the JSON says where the run stopped.
    signal.signal(signal.SIGTERM, _terminate)
    deadline = args.deadline if args.deadline is not None else (DEADLINE_S if not args.dry_run else 4 * DEADLINE_S)
    result = run_all(Path(args.out), dry_run=args.dry_run, sections=sections, deadline_s=deadline,
                     peak_tflops=args.peak_tflops)
    sys.stdout.write(format_table(result) + "\n")
    return 0 if all(e.get("status") in ("ok", "skipped") for e in result["sections"].values()) else 1
