"""Real 2-process fits of the text-to-image system on CPU (gloo): validation under DDP, uneven shards.

Each rank runs ``mmdiff.run.training.fit`` (tests/scale/fit_worker.py adds probes): every rank
validates its share of the validation set, ``val/loss`` is reduced over ranks, sample grids are
rendered by rank 0 only, and checkpointing is called on every rank (rank 0 writes; the data
position inside holds both ranks'). With 3 uneven shards, 2 workers per rank and validation
padding, neither training nor validation hangs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import HERE, clean_env, free_port
from multiproc import run_all
from tiny_configs import tiny_t2i_config
from datakit import sized_shards


def run_fit(config: Path, tmp_path: Path, *overrides: str, timeout: float = 300) -> List[Dict]:
    port = str(free_port())
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    run_all([[sys.executable, str(HERE / "fit_worker.py"), str(config), str(r), "2", port, str(outs[r]),
              "trainer.strategy=ddp", *overrides] for r in range(2)], tmp_path / "logs", clean_env(), timeout)
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_validation_under_ddp(tmp_path: Path, digits16: Path) -> None:
    config = tiny_t2i_config(tmp_path, digits16, trainer={"max_steps": 6, "val_every_n_steps": 3,
                                                          "limit_val_batches": 2, "checkpoint_every_n_steps": 3},
                             sampling={"prompts": ["a handwritten digit one"], "steps": 2, "every_n_steps": 3})
    r0, r1 = run_fit(config, tmp_path)
    for r in (r0, r1):
        assert r["global_step"] == 6 and r["train_batches"] == 6
        assert r["val_batches"] == 4  # every rank validates: 2 passes x limit_val_batches=2
        assert [e["step"] for e in r["val_epochs"]] == [3, 6]
    # each rank scored its own samples; the logged val/loss is the mean over ranks, the same on both
    assert not set(r0["val_keys"]) & set(r1["val_keys"])
    assert r0["reduced_val_loss"] == r1["reduced_val_loss"]
    local = [sum(r["val_epochs"][-1]["local"]) / len(r["val_epochs"][-1]["local"]) for r in (r0, r1)]
    assert local[0] != local[1]
    assert abs(r0["reduced_val_loss"] - sum(local) / 2) < 1e-5, (r0["reduced_val_loss"], local)
    # sample grids: rank 0 only (steps 0, 3, 6)
    assert r0["previews"] == 3 and r1["previews"] == 0
    assert len(list((tmp_path / "run" / "samples").glob("samples_step*.png"))) == 3
    # checkpoints: written once, with both ranks' data positions (gathered: every rank saved)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ranks = ckpt["callbacks"]["DataPosition"]["ranks"]
    assert [p["rank"] for p in ranks] == [0, 1] and all(p["consumed"] == 6 for p in ranks)
    assert not set(r0["train_keys"]) & set(r1["train_keys"])  # disjoint training data


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_uneven_shards_two_ranks_two_workers_fit_without_hang(tmp_path: Path) -> None:
    shards = sized_shards(tmp_path / "uneven", [5, 17, 40], prefix="train")
    val = sized_shards(tmp_path / "uneven", [3, 11, 7], prefix="val")
    assert len(shards) == len(val) == 3
    config = tiny_t2i_config(tmp_path, tmp_path / "uneven",
                             data={"num_workers": 2, "steps_per_epoch": 5, "batch_size": 3, "val_batch_size": 4},
                             trainer={"max_steps": 12, "val_every_n_steps": 5, "limit_val_batches": None,
                                      "checkpoint_every_n_steps": 6},
                             sampling={"prompts": []})
    r0, r1 = run_fit(config, tmp_path, timeout=300)
    for r in (r0, r1):
        assert r["global_step"] == 12 and r["train_batches"] == 12
        # 21 validation samples over 2 ranks x 2 workers: 6 per slot (padded) -> 2 batches of 4 per
        # worker -> 4 per rank and pass; passes after steps 5 and 10
        assert r["val_batches"] == 8
    val_keys = r0["val_keys"] + r1["val_keys"]
    assert sorted(val_keys) == sorted(list(set(val_keys)) * 2)  # each sample once per pass, over both ranks
    assert len(set(val_keys)) == 21
    assert not set(r0["train_keys"]) & set(r1["train_keys"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_keeps_ema_and_renders_previews_like_ddp(tmp_path: Path, digits16: Path) -> None:
    """FSDP2 with EMA and previews: no hang, full-size EMA tensors in the checkpoint equal to DDP's."""
    shadows, weights, previews = {}, {}, {}
    for strategy in ("ddp", "fsdp"):
        config = tiny_t2i_config(tmp_path, digits16, run=strategy,
                                 trainer={"max_steps": 6, "checkpoint_every_n_steps": 3, "val_every_n_steps": 3},
                                 # a large Adam eps: near-zero gradients then do not turn the ranks'
                                 # different reduction order (1e-8) into 1e-4 weight differences
                                 optim={"warmup_steps": 2, "eps": 1e-2, "lr": 1e-2},
                                 sampling={"prompts": ["a handwritten digit one"], "steps": 2, "every_n_steps": 3})
        r0, r1 = run_fit(config, tmp_path, f"trainer.strategy={strategy}")
        assert r0["global_step"] == r1["global_step"] == 6
        previews[strategy] = (r0["previews"], r1["previews"])
        assert len(list((tmp_path / strategy / "samples").glob("samples_step*.png"))) == 3
        ckpt = torch.load(tmp_path / strategy / "checkpoints" / "last.ckpt", weights_only=True)
        unet = [v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")]
        shadow = ckpt["callbacks"]["EMA"]["shadow"]
        assert [s.shape for s in shadow] == [p.shape for p in unet]  # full tensors, not rank 0's shards
        shadows[strategy], weights[strategy] = shadow, unet
    assert previews == {"ddp": (3, 0), "fsdp": (3, 3)}  # sharded: every rank takes part in sampling
    ema_diff = max(float((a - b).abs().max()) for a, b in zip(shadows["ddp"], shadows["fsdp"]))
    weight_diff = max(float((a - b).abs().max()) for a, b in zip(weights["ddp"], weights["fsdp"]))
    ema_moved = max(float((a - b).abs().max()) for a, b in zip(shadows["fsdp"], weights["fsdp"]))
    assert ema_diff < 1e-5, (ema_diff, weight_diff, ema_moved)
