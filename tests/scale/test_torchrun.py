"""Two "nodes" on localhost with torchrun (one process each), the way docs/scale_out.md shows it.

The default run keeps one fast case (DDP, 2 steps); the 4-step DDP and FSDP2 runs are marked slow.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import clean_env, free_port
from multiproc import run_all
from tiny_configs import tiny_t2i_config


@pytest.mark.xdist_group("multirank")  # make test: one xdist worker runs these one after another
@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy, steps", [
    pytest.param("ddp", 2, id="fast-ddp"),
    pytest.param("ddp", 4, id="ddp", marks=pytest.mark.slow),
    pytest.param("fsdp", 4, id="fsdp", marks=pytest.mark.slow),
])
def test_torchrun_two_nodes_one_process_each(tmp_path: Path, digits16: Path, strategy: str, steps: int) -> None:
    config = tiny_t2i_config(tmp_path, digits16, trainer={"max_steps": steps, "checkpoint_every_n_steps": 2},
                             sampling={"prompts": []})
    first = _torchrun(config, strategy)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == steps
    ranks = ckpt["callbacks"]["DataPosition"]["ranks"]  # one world of two ranks trained
    assert [(p["rank"], p["world"], p["consumed"]) for p in ranks] == [(0, 2, steps), (1, 2, steps)]
    if strategy == "fsdp":
        assert "FSDP2: sharded unet over a (2,) mesh" in first
        # resume (full-state checkpoint loaded into the sharded U-Net and its optimiser) and go on
        _torchrun(config, strategy, "trainer.max_steps=6", "--resume", "last")
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 6
        adam = ckpt["optimizer_states"][0]["state"]  # keyed by parameter id over the whole system
        assert adam and all(int(state["step"]) == 6 for state in adam.values())  # continued, not restarted
        assert [p["consumed"] for p in ckpt["callbacks"]["DataPosition"]["ranks"]] == [6, 6]


def _torchrun(config: Path, strategy: str, *extra: str) -> str:
    """Both "nodes" of ``mmdiff fit CONFIG`` under torchrun; returns their output."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    port = str(free_port())
    logs = run_all([[torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                        "--master-addr", "127.0.0.1", "--master-port", port, "--no-python",
                        str(Path(sys.executable).parent / "mmdiff"), "fit", str(config),
                        f"trainer.strategy={strategy}", "trainer.num_nodes=2", "trainer.devices=1", *extra]
                       for node in (0, 1)], config.parent / f"logs-{strategy}", clean_env(), 300)
    return "".join(logs)
