"""Fast checks of the scale-out pieces: strategy from config, config checks, per-batch seeds,
the requeue signal saving at a batch boundary."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from tiny_configs import tiny_t2i_config
from mmdiff.callbacks.data_position import StepSeedCallback, step_seed
from mmdiff.callbacks.requeue import RequeueOnSignal, StopForSignal
from mmdiff.config import STRATEGY_NAMES as CONFIG_NAMES
from mmdiff.config import load_config
from mmdiff.errors import ConfigError
from mmdiff.run.strategies import STRATEGY_NAMES, FSDP2Strategy, build_strategy, shard_trainable, trainable_children


def test_strategy_names_agree() -> None:
    assert CONFIG_NAMES == STRATEGY_NAMES


def test_build_strategy_from_config(tmp_path: Path, digits16: Path) -> None:
    config = tiny_t2i_config(tmp_path, digits16)
    assert build_strategy(load_config(config)) == "auto"
    assert build_strategy(load_config(config, ["trainer.strategy=ddp"])) == "ddp"
    fsdp = build_strategy(load_config(config, ["trainer.strategy=fsdp", "trainer.fsdp_sharding=hybrid"]))
    assert isinstance(fsdp, FSDP2Strategy) and fsdp.sharding == "hybrid"
    assert build_strategy(load_config(config, ["trainer.strategy=fsdp"])).sharding == "full"


@pytest.mark.parametrize("override, message", [
    ("trainer.strategy=dpp", "unknown trainer.strategy 'dpp'; choose one of: auto, ddp"),
    ("trainer.fsdp_sharding=partial", "trainer.fsdp_sharding"),
])
def test_bad_strategy_settings_fail_early(tmp_path: Path, digits16: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_t2i_config(tmp_path, digits16), [override])


def test_only_trainable_modules_are_sharded(tmp_path: Path, digits16: Path) -> None:
    from mmdiff.systems.text_to_image import TextToImageSystem

    system = TextToImageSystem(load_config(tiny_t2i_config(tmp_path, digits16)))
    assert trainable_children(system) == ["unet"]  # frozen VAE and CLIP stay replicated
    assert shard_trainable(system) == []  # no FSDP mesh (not under the fsdp strategy): no-op


def test_step_seeds_depend_on_seed_rank_and_batch() -> None:
    seeds = {step_seed(s, r, i) for s in (0, 1) for r in (0, 1) for i in (1, 2, 3)}
    assert len(seeds) == 12 and step_seed(0, 1, 2) == step_seed(0, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)


class _Toy(L.LightningModule):
    """Trains on random inputs drawn in the step (so only the per-batch seeds decide the data)."""

    def __init__(self, signal_at: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.signal_at = signal_at
        self.noise = []

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives in the middle of the step
        x = torch.randn(4, 4)
        self.noise.append(x.sum().item())
        return self.lin(x).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, *callbacks) -> L.Trainer:
    from lightning.pytorch.callbacks import Checkpoint

    # RequeueOnSignal is a Checkpoint callback; without one, Lightning would add its default ModelCheckpoint.
    return L.Trainer(default_root_dir=str(tmp_path), max_steps=8, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks), enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[StepSeedCallback(0), *callbacks])


@pytest.fixture
def no_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a SLURM job the callback saves and stops but requeues nothing (not the job running the tests)."""
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


def test_requeue_signal_saves_at_the_batch_boundary_and_resumes_exactly(tmp_path: Path, no_slurm_job: None) -> None:
    straight = _Toy()
    _trainer(tmp_path / "a").fit(straight)
    stopped = _Toy(signal_at=3)
    requeue = RequeueOnSignal()
    with pytest.raises(StopForSignal):
        _trainer(tmp_path / "b", requeue).fit(stopped)
    assert requeue.saved == str(tmp_path / "b" / "hpc_ckpt_1.ckpt")
    assert torch.load(requeue.saved, weights_only=True)["global_step"] == 4  # step 4 done, then stopped
    assert signal.getsignal(signal.SIGUSR1) is not requeue._handler  # handler removed after the fit
    resumed = _Toy()
    _trainer(tmp_path / "b").fit(resumed, ckpt_path=requeue.saved)
    assert stopped.noise + resumed.noise == straight.noise  # per-batch seeds: no repeat, no gap
    assert torch.equal(resumed.lin.weight, straight.lin.weight)


def test_requeue_checkpoint_is_written_after_a_periodic_one_at_the_same_step(tmp_path: Path,
                                                                            no_slurm_job: None) -> None:
    """A signal landing on a periodic-checkpoint step: hpc_ckpt_1.ckpt is the newest file, so the
    requeued job resumes from it (and its ModelCheckpoint state already knows that step's file)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    periodic = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=4, save_last=True)
    requeue = RequeueOnSignal()
    with pytest.raises(StopForSignal):
        _trainer(tmp_path, periodic, requeue).fit(_Toy(signal_at=3))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4  # the periodic save at the same step
    # mmdiff.run.resume breaks a tie of steps by modification time: the requeue file is the newer.
    assert torch.load(requeue.saved, weights_only=False)["global_step"] == 4
    assert Path(requeue.saved).stat().st_mtime_ns > last.stat().st_mtime_ns
    saved_state = torch.load(requeue.saved, weights_only=False)["callbacks"]
    periodic_state = next(v for k, v in saved_state.items() if k.startswith("ModelCheckpoint"))
    assert periodic_state["last_model_path"] == str(last)
