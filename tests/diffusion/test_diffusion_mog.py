"""Every sampler reproduces a 2-D Gaussian mixture under the exact denoiser (no training).

Writes the NFE-vs-distance table into docs/diffusion_samplers.md and prints it.
"""
from __future__ import annotations

import logging
import time

import pytest
import torch

from diffusion_docs import write_section
from mmdiff.diffusion import GaussianDiffusion, NoiseSchedule
from mmdiff.diffusion.toy import GaussianMixture2D, sliced_wasserstein

# make test (pytest-xdist): one worker runs this module, so its module fixture (the sampler table) is built once
pytestmark = pytest.mark.xdist_group("mog_table")

log = logging.getLogger(__name__)
N = 4000
SW_MAX, MODE_MAX = 0.05, 0.03
MOG = GaussianMixture2D(8, radius=1.0, std=0.05, weights=[1, 2, 3, 4, 1, 2, 3, 4])
SCHEDULE = NoiseSchedule.make("linear", 1000, 1e-4, 0.02)

# (label, sampler, steps, extra kwargs, recommended → asserted)
ROWS = [
    ("DDPM-1000", "ddpm", 1000, {}, True),
    ("DDIM-50", "ddim", 50, {}, True),
    ("Euler-50", "euler", 50, {}, True),
    ("Euler-Karras-50", "euler_karras", 50, {}, True),
    ("Heun-18 (Karras)", "heun", 18, {}, True),
    ("DPM++2M-20", "dpmpp_2m", 20, {}, True),
    ("DPM++2M-Karras-20", "dpmpp_2m_karras", 20, {}, True),
    ("PC: DDPM-50 + 1 Langevin (snr 0.16)", "ddpm", 50, {"corrector_steps": 1}, True),
    ("DDPM-100", "ddpm", 100, {}, False),
    ("DDIM-10", "ddim", 10, {}, False),
    ("Euler-10", "euler", 10, {}, False),
    ("Heun-5 (Karras)", "heun", 5, {}, False),
    ("DPM++2M-Karras-10", "dpmpp_2m_karras", 10, {}, False),
    ("DPM++2M-Karras-5", "dpmpp_2m_karras", 5, {}, False),
]


def _counting(model):
    calls = [0]

    def fn(x, t, cond=None):
        calls[0] += 1
        return model(x, t, cond)

    return fn, calls


@pytest.fixture(scope="module")
def table():
    torch.manual_seed(0)
    reference = MOG.sample(N, torch.Generator().manual_seed(0))
    floor = sliced_wasserstein(MOG.sample(N, torch.Generator().manual_seed(1)), reference)
    diff = GaussianDiffusion(SCHEDULE, prediction_type="epsilon")
    rows = []
    for label, sampler, steps, extra, recommended in ROWS:
        model, calls = _counting(MOG.model(SCHEDULE, "epsilon"))
        start = time.perf_counter()
        x = diff.sample(model, (N, 2), sampler=sampler, steps=steps, timestep_spacing="leading",
                        generator=torch.Generator().manual_seed(1), dtype=torch.float64, **extra)
        seconds = time.perf_counter() - start
        sw = sliced_wasserstein(x, reference)
        mode_err = float((MOG.mode_weights(x) - MOG.weights).abs().max())
        rows.append(dict(label=label, nfe=calls[0], sw=sw, mode=mode_err, ok=recommended, seconds=seconds))
    lines = [
        "| sampler | NFE | sliced W1 | mode err | asserted |",
        "|---|---:|---:|---:|:---:|",
        f"| true mixture, independent draw (floor) | – | {floor:.4f} | – | |",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['nfe']} | {r['sw']:.4f} | {r['mode']:.4f} | {'✓' if r['ok'] else ''} |")
    text = "\n".join(lines)
    print("\n" + text)
    log.info("sampler table:\n%s", text)
    write_section("sampler-table", text)
    return {r["label"]: r for r in rows}


@pytest.mark.parametrize("label", [r[0] for r in ROWS if r[4]])
def test_sampler_reproduces_mixture(table, label):
    row = table[label]
    assert row["sw"] <= SW_MAX, f"{label}: sliced W1 {row['sw']:.4f} > {SW_MAX}"
    assert row["mode"] <= MODE_MAX, f"{label}: mode weight error {row['mode']:.4f} > {MODE_MAX}"


def test_nfe_counts(table):
    assert table["DDPM-1000"]["nfe"] == 1000
    assert table["Heun-18 (Karras)"]["nfe"] == 35
    assert table["DPM++2M-20"]["nfe"] == 20
    assert table["PC: DDPM-50 + 1 Langevin (snr 0.16)"]["nfe"] == 50 + 49


@pytest.mark.parametrize("pred", ["sample", "v_prediction"])
def test_other_parameterisations_and_zero_snr(pred):
    """x0- and v-prediction, and a zero-terminal-SNR schedule with v-prediction and trailing steps."""
    reference = MOG.sample(2000, torch.Generator().manual_seed(0))
    for schedule, spacing in [(SCHEDULE, "leading"),
                              (NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True), "trailing")]:
        diff = GaussianDiffusion(schedule, prediction_type=pred)
        x = diff.sample(MOG.model(schedule, pred), (2000, 2), sampler="dpmpp_2m_karras" if spacing == "leading" else "ddim",
                        steps=25, timestep_spacing=spacing, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        assert sliced_wasserstein(x, reference) <= SW_MAX
        assert float((MOG.mode_weights(x) - MOG.weights).abs().max()) <= MODE_MAX
