"""Parity: 2 CPU processes (gloo) × {DDP, FSDP2 full, FSDP2 hybrid} vs one process, same global batch.

The real text-to-image system (tiny) trains 5 steps on a fixed global batch of 8 samples; with
two ranks each gets half of it. Timesteps and noise are drawn per sample from its global index
(tests/scale/parity_worker.py), so the only difference between the setups is the arithmetic of
the gradient reduction. Compared: the rank-mean losses, every gradient of the first step as the
optimiser sees it (before clipping: AdamW with clipping barely notices a gradient's scale, so a
sum-instead-of-mean reduction shows only here) and the U-Net's weights after the last step.
Tolerances are relative to the largest entry; measured differences are ~1e-7.
The default run keeps one fast case (DDP and FSDP2 full, 2 steps); the 5-step runs are marked slow.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from conftest import HERE, clean_env, free_port
from multiproc import run_all
from tiny_configs import tiny_t2i_config

TOL = 1e-4  # losses, absolute
GRAD_TOL = WEIGHT_TOL = 1e-4  # relative to the largest |entry| of each tensor
STEPS, FAST_STEPS = 5, 2
LORA_WEIGHT_TOL = 1e-3  # see test_lora_ddp_and_fsdp2_two_ranks_match_one_process


def rank_commands(config: Path, tmp_path: Path, world: int, strategy: str, sharding: str = "full",
                  num_nodes: int = 1, steps: int = STEPS) -> Tuple[List[List[str]], List[Path]]:
    """The parity_worker.py command of every rank of one run, and the files they write."""
    port = str(free_port())
    outs = [tmp_path / f"{strategy}-{sharding}-{world}-{steps}-{r}.json" for r in range(world)]
    return [[sys.executable, str(HERE / "parity_worker.py"), str(config), str(r), str(world), str(num_nodes),
             port, str(outs[r]), strategy, sharding, str(steps)] for r in range(world)], outs


def read_results(outs: List[Path]) -> List[Dict]:
    """Each rank's facts, with its first-step gradients and final weights."""
    results = [json.loads(o.read_text()) for o in outs]
    for out, result in zip(outs, results):
        result.update(torch.load(f"{out}.pt", weights_only=True))
    return results


def run_ranks(config: Path, tmp_path: Path, world: int, strategy: str, sharding: str = "full",
              num_nodes: int = 1, timeout: float = 240, steps: int = STEPS) -> List[Dict]:
    """Each rank's facts (parity_worker.py) of one run."""
    commands, outs = rank_commands(config, tmp_path, world, strategy, sharding, num_nodes, steps)
    run_all(commands, tmp_path / f"logs-{strategy}-{sharding}-{world}-{steps}", clean_env(), timeout)
    return read_results(outs)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, digits16: Path) -> Path:
    return tiny_t2i_config(tmp_path_factory.mktemp("parity"), digits16)


@pytest.fixture(scope="module")
def single(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict:
    (result,) = run_ranks(config, tmp_path_factory.mktemp("single"), 1, "auto")
    assert len(result["losses"]) == STEPS
    return result


def _rank_mean(results: List[Dict]) -> List[float]:
    return [sum(r["losses"][i] for r in results) / len(results) for i in range(len(results[0]["losses"]))]


def _max_rel(want: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], floor: float = 1e-30) -> float:
    """The largest per-tensor difference, relative to the tensor's largest value (at least ``floor``)."""
    assert sorted(got) == sorted(want) and want
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=floor)) for k in want)


# Weights are compared relative to max(|w|, 1e-2): a zero-initialised norm bias holds only its first
# AdamW updates (~lr each), and with a near-zero gradient Adam's step g/(|g|+eps) turns rounding-level
# gradient differences into ~1e-4 of that tiny value. A real divergence (a rank skipping or doubling
# an update) moves a weight by ~lr, far above 1e-4 of the floor.
WEIGHT_FLOOR = 1e-2


def _assert_parity(single: Dict, results: List[Dict], steps: int = STEPS, weight_tol: float = WEIGHT_TOL) -> str:
    """Losses, first-step gradients (on every rank) and final weights agree; returns the measured differences."""
    mean = _rank_mean(results)
    diffs = [abs(a - b) for a, b in zip(single["losses"], mean)]
    assert len(mean) == steps and max(diffs) <= TOL, (single["losses"], mean, diffs)
    grad = max(_max_rel(single["grads"], r["grads"]) for r in results)
    assert grad <= GRAD_TOL, f"first-step gradients differ by {grad:.2e} (relative) from one process's"
    weight = max(_max_rel(single["weights"], r["weights"], WEIGHT_FLOOR) for r in results)
    assert weight <= weight_tol, f"weights after {steps} steps differ by {weight:.2e} (relative)"
    return f"max |loss diff| {max(diffs):.2e}, gradients {grad:.2e}, weights {weight:.2e} (relative)"


@pytest.mark.xdist_group("multirank")  # make test: one xdist worker runs these one after another
@pytest.mark.timeout(400)
def test_ddp_and_fsdp2_two_ranks_match_one_process_fast(config: Path, tmp_path: Path) -> None:
    """The default run's parity case: the slow tests' comparison over 2 steps, with one process, two
    DDP ranks and two FSDP2 ranks started together (five processes share the start-up time)."""
    runs = {name: rank_commands(config, tmp_path, world, strategy, steps=FAST_STEPS)
            for name, world, strategy in (("one", 1, "auto"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp"))}
    run_all([c for commands, _ in runs.values() for c in commands], tmp_path / "logs-fast", clean_env(), 360)
    (one,), ddp, fsdp = (read_results(outs) for _, outs in runs.values())
    print(f"DDP ({FAST_STEPS} steps): {_assert_parity(one, ddp, FAST_STEPS)}")
    print(f"FSDP2 ({FAST_STEPS} steps): {_assert_parity(one, fsdp, FAST_STEPS)}")
    assert all(r["strategy"] == "DDPStrategy" for r in ddp)
    assert all(r["strategy"] == "FSDP2Strategy" and r["unet_sharded"] for r in fsdp)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_two_ranks_match_one_process(config: Path, single: Dict, tmp_path: Path) -> None:
    results = run_ranks(config, tmp_path, 2, "ddp")
    print(f"DDP over {STEPS} steps: {_assert_parity(single, results)}")
    assert all(r["strategy"] == "DDPStrategy" and not r["unet_sharded"] for r in results)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sharding, num_nodes, mesh", [("full", 1, [2]), ("hybrid", 2, [2, 1])])
def test_fsdp2_two_ranks_match_one_process(config: Path, single: Dict, tmp_path: Path, sharding: str,
                                           num_nodes: int, mesh: List[int]) -> None:
    results = run_ranks(config, tmp_path, 2, "fsdp", sharding, num_nodes=num_nodes)
    print(f"FSDP2 {sharding} over {STEPS} steps: {_assert_parity(single, results)}")
    for r in results:
        assert r["strategy"] == "FSDP2Strategy" and r["mesh"] == mesh
        assert r["unet_sharded"] and not r["frozen_sharded"]  # U-Net sharded, VAE/CLIP replicated
        assert r["vae_dtype"] == "torch.float32"


@pytest.fixture(scope="module")
def lora_config(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parity config with rank-4 LoRA adapters on a saved U-Net (U-Net and text tower adapted)."""
    import yaml

    from mmdiff.config import load_config
    from mmdiff.systems.text_to_image import TextToImageSystem

    tmp = tmp_path_factory.mktemp("lora-parity")
    torch.manual_seed(0)
    unet = TextToImageSystem(load_config(config, ["model.vae.scaling_factor=0.5"])).unet
    with torch.no_grad():  # a fresh conv_out is zero: the adapters' gradients would vanish behind it
        unet.conv_out.weight.normal_(0, 0.02)
    unet.save_pretrained(tmp / "unet")
    path = tmp / "lora.yaml"
    path.write_text(yaml.safe_dump({"base": [str(config)], "model": {
        "unet": {"pretrained": str(tmp / "unet")},
        "lora": {"rank": 4, "alpha": 4.0, "text_encoder": True}}}))
    return path


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lora_ddp_and_fsdp2_two_ranks_match_one_process(lora_config: Path, tmp_path: Path) -> None:
    """With model.lora only the adapters train (U-Net and text tower); DDP and FSDP2 (which shards the
    U-Net and the CLIP, both holding trainable adapters) reduce their gradients like one process."""
    runs = {name: rank_commands(lora_config, tmp_path, world, strategy, steps=FAST_STEPS)
            for name, world, strategy in (("one", 1, "auto"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp"))}
    run_all([c for commands, _ in runs.values() for c in commands], tmp_path / "logs-lora", clean_env(), 360)
    (one,), ddp, fsdp = (read_results(outs) for _, outs in runs.values())
    assert one["grads"] and all(".lora_" in k for k in one["grads"])  # only adapters train
    # Weights relative to their largest entry: a LoRA B starts at zero, so after two AdamW steps
    # (each entry moved by ~lr·g/|g|) rounding-level gradient differences show at ~1e-4 of it.
    print(f"LoRA DDP ({FAST_STEPS} steps): {_assert_parity(one, ddp, FAST_STEPS, LORA_WEIGHT_TOL)}")
    print(f"LoRA FSDP2 ({FAST_STEPS} steps): {_assert_parity(one, fsdp, FAST_STEPS, LORA_WEIGHT_TOL)}")
    # every adapter sits in a block (down/mid/up, text resblocks): the blocks are the FSDP units and the
    # frozen roots (conv_in, embeddings) stay replicated
    assert all(r["strategy"] == "FSDP2Strategy" and not r["unet_sharded"] for r in fsdp)
