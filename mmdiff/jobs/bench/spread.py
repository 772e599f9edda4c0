"""Statistics of interleaved timings: quartiles, paired ratios, and whether a ratio can be judged.

Pure functions over lists of seconds (no torch), so they are tested on synthetic timings.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence

# 95 % half-width of a median from n samples ≈ Z95 · MEDIAN_SE · σ / √n, σ ≈ IQR / IQR_SIGMA
# (normal approximation; paired ratios of step times are close enough to normal for a go/no-go).
Z95, MEDIAN_SE, IQR_SIGMA = 1.96, 1.2533, 1.349


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3) of ``xs`` (inclusive method); NaNs when empty, all equal for one value."""
    if not xs:
        return (float("nan"),) * 3
    if len(xs) == 1:
        return (float(xs[0]),) * 3
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return float(q1), float(med), float(q3)


def summary(xs: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, IQR and IQR relative to the median of ``xs``."""
    q1, med, q3 = quartiles(xs)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1,
            "iqr_rel": (q3 - q1) / med if med else float("nan"), "n": len(xs)}


def grouped_ratios(a: Sequence[float], a_groups: Sequence[int], b: Sequence[float],
                   b_groups: Sequence[int]) -> List[float]:
    """median(a in group g) / median(b in group g) for every group both sides have, in group order."""
    out = []
    for g in sorted(set(a_groups) & set(b_groups)):
        num = statistics.median([x for x, k in zip(a, a_groups) if k == g])
        den = statistics.median([x for x, k in zip(b, b_groups) if k == g])
        if den > 0:
            out.append(num / den)
    return out


def half_width(ratios: Sequence[float]) -> float:
    """Relative 95 % half-width of the median of ``ratios`` (inf with fewer than two)."""
    if len(ratios) < 2:
        return float("inf")
    s = summary(ratios)
    return Z95 * MEDIAN_SE * (s["iqr"] / IQR_SIGMA) / math.sqrt(len(ratios)) / s["median"]


def samples_needed(ratios: Sequence[float], precision: float = 0.05) -> Optional[int]:
    """How many paired ratios make the median's half-width ≤ ``precision`` (None with < 2)."""
    if len(ratios) < 2:
        return None
    s = summary(ratios)
    sigma_rel = (s["iqr"] / IQR_SIGMA) / s["median"]
    return max(2, math.ceil((Z95 * MEDIAN_SE * sigma_rel / precision) ** 2))


#: Runnable processes above the CPU count the load check tolerates. The 1-minute load average also
#: counts the bench's own short-lived work (start-up, loader and gloo threads, the shell), so a bench
#: that itself keeps every core busy (the 2-rank DDP bench on 2 CPUs) reads 2.0–2.1 on a quiet machine.
LOAD_MARGIN = 0.5


def judge(ratios: Sequence[float], *, per_round: int, rounds: int, load: Optional[float] = None,
          cpus: Optional[int] = None, precision: float = 0.05) -> Dict[str, Any]:
    """Whether the paired ratios settle the ratio to ±``precision``: the verdict and why.

    ``per_round`` pairs were measured in each of ``rounds`` rounds; ``load`` is the highest 1-minute
    load average seen and ``cpus`` the machine's CPU count (load above it by more than
    :data:`LOAD_MARGIN`: other jobs took turns with the bench, which pairing cancels only partly).
    """
    hw = half_width(ratios)
    need = samples_needed(ratios, precision)
    reasons = []
    if not hw <= precision:
        reasons.append(f"ratio ±{100 * hw:.1f} % > ±{100 * precision:.0f} %" if math.isfinite(hw)
                       else "fewer than two pairs")
    if load is not None and cpus and load > cpus + LOAD_MARGIN:
        reasons.append(f"load {load:.2f} > {cpus} CPUs")
    more = 0
    if need is not None and need > len(ratios):
        more = math.ceil(need / max(1, per_round)) - rounds
        more = max(1, more)
    noisy = bool(reasons)
    text = ("too noisy to judge (" + "; ".join(reasons) + ")" if noisy
            else f"judged: ±{100 * hw:.1f} % (95 %)")
    if noisy and math.isfinite(hw) and hw <= precision:
        text += f"; the ratio alone: ±{100 * hw:.1f} % (95 %)"
    if noisy and more:
        text += f"; about {more} more round(s) for ±{100 * precision:.0f} %"
    return {"half_width_rel": hw, "pairs_needed": need, "more_rounds": more, "noisy": noisy,
            "reasons": reasons, "text": text}
