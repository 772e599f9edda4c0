"""One rank of the loss-parity runs (tests/scale/test_parity.py; not collected by pytest).

usage: python parity_worker.py CONFIG RANK WORLD NUM_NODES PORT OUT_JSON STRATEGY [SHARDING [STEPS]]

Trains the real text-to-image system (tiny config) for STEPS (default 5) steps on a fixed in-memory global batch
of 8 synthetic samples per step: rank r of W gets rows [r*8/W, (r+1)*8/W) — so the union of the
ranks' batches is the single process's batch. Randomness is tied to the *sample*, not the rank:
each sample's timestep and noise come from a generator seeded with its global index, latents are
the VAE posterior mean and there is no caption dropout (see ParitySystem). Writes this rank's
per-step losses (and facts about the sharding) to OUT_JSON, and to OUT_JSON + ".pt" the trainable
parameters' gradients of the first step as the optimiser gets them (reduced across ranks, before
clipping) and the U-Net's weights after the last step, both as full tensors.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from typing import Any, Dict, Iterator

import torch

GLOBAL_BATCH = 8
STEPS = int(sys.argv[9]) if len(sys.argv) > 9 else 5


def sample(index: int) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(10_000 + index)
    return {"image": torch.rand(3, 16, 16, generator=g) * 2 - 1,
            "caption": f"a handwritten digit {index % 10}", "index": index}


class FixedBatches(torch.utils.data.IterableDataset):
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return STEPS

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        per = GLOBAL_BATCH // self.world
        for step in range(STEPS):
            rows = [sample(step * GLOBAL_BATCH + self.rank * per + i) for i in range(per)]
            yield {"image": torch.stack([r["image"] for r in rows]), "caption": [r["caption"] for r in rows],
                   "index": torch.tensor([r["index"] for r in rows])}


def main() -> None:
    config, rank, world, num_nodes, port, out_path, strategy = sys.argv[1:8]
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests/multiproc.py dumps our stacks on a timeout
    sharding = sys.argv[8] if len(sys.argv) > 8 else "full"
    rank, world, num_nodes = int(rank), int(world), int(num_nodes)
    torch.set_num_threads(1)
    if world > 1:
        per_node = world // num_nodes
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world), RANK=str(rank),
                          LOCAL_RANK=str(rank % per_node), NODE_RANK=str(rank // per_node))
    import lightning as L
    from torch.distributed.tensor import DTensor

    def full(t: torch.Tensor) -> torch.Tensor:
        """The whole tensor on every rank (a collective for a sharded DTensor)."""
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    from mmdiff.config import load_config
    from mmdiff.run.strategies import build_strategy
    from mmdiff.systems.text_to_image import TextToImageSystem

    class ParitySystem(TextToImageSystem):
        """The text-to-image system with per-sample randomness (timestep and noise by sample index)."""

        losses: list = []
        first_grads: dict = {}

        def on_before_optimizer_step(self, optimizer):
            # Lightning calls this before gradient clipping: the gradients' scale still shows.
            if self.trainer.global_step == 0:
                self.first_grads.update({name: full(p.grad) for name, p in self.named_parameters()
                                         if p.grad is not None})

        def training_step(self, batch, batch_idx):
            latents = self.batch_latents(batch, sample=False)
            cond = self.batch_condition(batch, None)
            ts, noises = [], []
            for index in batch["index"].tolist():
                g = torch.Generator().manual_seed(777 + index)
                ts.append(torch.randint(0, self.diffusion.num_timesteps, (1,), generator=g))
                noises.append(torch.randn(latents.shape[1:], generator=g))
            out = self.diffusion.training_loss(lambda x, t: self.denoise(x, t, cond), latents,
                                               t=torch.cat(ts).to(self.device),
                                               noise=torch.stack(noises).to(self.device))
            self.losses.append(float(out["loss"].detach()))
            return out["loss"]

    cfg = load_config(config, [f"trainer.strategy={strategy}", f"trainer.fsdp_sharding={sharding}",
                               f"trainer.num_nodes={num_nodes}", f"trainer.devices={world // num_nodes}",
                               "model.caption_dropout=0", "model.vae.scaling_factor=0.5"])
    L.seed_everything(0, verbose=False)
    system = ParitySystem(cfg)
    trainer = L.Trainer(
        accelerator="cpu", devices=world // num_nodes, num_nodes=num_nodes,
        strategy=build_strategy(cfg) if world > 1 else "auto", max_steps=STEPS,
        gradient_clip_val=cfg.trainer.gradient_clip_val, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, use_distributed_sampler=False, sync_batchnorm=False,
    )
    loader = torch.utils.data.DataLoader(FixedBatches(rank, world), batch_size=None)
    trainer.fit(system, train_dataloaders=loader)
    unet_dtensor = [isinstance(p, DTensor) for p in system.unet.parameters()]
    facts = {
        "losses": system.losses,
        "strategy": type(trainer.strategy).__name__,
        "unet_sharded": all(unet_dtensor) and len(unet_dtensor) > 0,
        "frozen_sharded": any(isinstance(p, DTensor) for m in (system.vae, system.clip) for p in m.parameters()),
        "vae_dtype": str(next(system.vae.parameters()).dtype),
        "mesh": list(trainer.strategy.fsdp_mesh.shape) if getattr(trainer.strategy, "fsdp_mesh", None) is not None else None,
    }
    torch.save({"grads": system.first_grads,
                "weights": {name: full(p) for name, p in system.unet.named_parameters()}}, out_path + ".pt")
    with open(out_path, "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()
