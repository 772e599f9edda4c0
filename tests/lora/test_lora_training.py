"""text_to_image with ``model.lora``: only adapters train, are EMA'd and checkpointed; a LoRA
checkpoint loads onto the base the config names, resumes exactly, and samples at any adapter scale."""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lorakit import PROMPTS, base_system, write_base_checkpoint  # noqa: E402
from tiny_configs import tiny_t2i_config  # noqa: E402

from mmdiff.cli import main  # noqa: E402
from mmdiff.errors import CheckpointError, UsageError  # noqa: E402
from mmdiff.inference.api import load  # noqa: E402
from mmdiff.models.lora import is_lora_key  # noqa: E402

STEPS, CHECKPOINT_AT = 6, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmdiff.data.writers import write_demo_shards

    out = tmp_path_factory.mktemp("digits16")
    write_demo_shards(out, image_size=16, samples_per_shard=60, seed=0)
    return out


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base_checkpoint(base_system(), tmp_path_factory.mktemp("base") / "base.ckpt")


def _config(tmp: Path, shards: Path, base_ckpt: Path, run: str = "lora") -> Path:
    return tiny_t2i_config(
        tmp, shards, run,
        model={"init_from": str(base_ckpt), "lora": {"rank": 4, "alpha": 4.0}, "caption_dropout": 0.2},
        data={"batch_size": 4, "steps_per_epoch": 4},
        trainer={"max_steps": STEPS, "checkpoint_every_n_steps": CHECKPOINT_AT},
        optim={"lr": 5e-3, "warmup_steps": 2},
    )


def _fit(config: Path, *extra: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels in every fit of this module: the same float results
    try:
        assert main(["fit", str(config), *extra]) == 0
    finally:
        torch.set_num_threads(threads)


def _losses(run_dir: Path) -> Dict[int, float]:
    out: Dict[int, float] = {}
    for version in sorted((run_dir / "csv").glob("version_*")):
        with open(version / "metrics.csv") as f:
            out.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shards: Path, base_ckpt: Path) -> Path:
    tmp = tmp_path_factory.mktemp("lora-run")
    _fit(_config(tmp, shards, base_ckpt))
    return tmp / "lora"


def test_only_adapters_train_and_are_checkpointed(trained: Path, base_ckpt: Path) -> None:
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    adapters = [k for k in state if is_lora_key(k)]
    assert adapters and all(k.startswith("unet.") for k in adapters)
    assert sorted(set(state) - set(adapters)) == ["latent_scale"]  # the base is read again from init_from
    shadow = ckpt["callbacks"]["EMA"]["shadow"]
    assert [tuple(s.shape) for s in shadow] == [tuple(state[k].shape) for k in adapters if "lora_" in k]
    assert all(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # B starts at 0: it trained
    opt_params = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert opt_params == len(adapters)
    size, full = (trained / "checkpoints" / "last.ckpt").stat().st_size, base_ckpt.stat().st_size
    print(f"tiny model: LoRA checkpoint {size / 1e3:.1f} kB vs full weights {full / 1e3:.1f} kB")
    assert size < full / 10

    system = load(trained / "checkpoints" / "last.ckpt")
    base = load(base_ckpt)
    frozen = {k: v for k, v in system.state_dict().items() if not is_lora_key(k)}
    base_state = {k.replace(".base_layer.", "."): v for k, v in frozen.items()}
    assert all(torch.equal(base_state[k], v) for k, v in base.state_dict().items())  # base untouched
    assert system.ema_loaded


def test_lora_scale_zero_samples_the_base_model_exactly(trained: Path, base_ckpt: Path) -> None:
    system, base = load(trained / "checkpoints" / "last.ckpt"), load(base_ckpt)
    options = dict(seed=3, sampler="ddim", steps=3, guidance_scale=2.0)  # the two configs' differ
    want = base.sample(PROMPTS, **options)
    assert torch.equal(system.sample(PROMPTS, lora_scale=0.0, **options), want)
    adapted = system.sample(PROMPTS, **options)
    assert float((adapted - want).abs().max()) > 1e-4
    assert torch.equal(system.sample(PROMPTS, lora_scale=1.0, **options), adapted)
    with pytest.raises(ValueError, match="LoRA"):
        base.sample(PROMPTS, lora_scale=0.5)


def test_cli_sample_lora_scale(trained: Path, base_ckpt: Path, tmp_path: Path, capsys) -> None:
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    assert main(["sample", ckpt, "--prompt", PROMPTS[0], "--n", "1", "--steps", "2", "--lora-scale", "0.5",
                 "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid.png").is_file()
    code = main(["sample", str(base_ckpt), "--prompt", "x", "--lora-scale", "0.5", "--out", str(tmp_path / "t")])
    assert code == UsageError.exit_code and "--lora-scale needs a checkpoint trained with LoRA" in capsys.readouterr().err


def test_resume_from_a_lora_checkpoint_is_exact(trained: Path, shards: Path, base_ckpt: Path,
                                                 tmp_path: Path) -> None:
    """Resumed from its step-3 checkpoint, the run ends with the uninterrupted run's adapters, EMA and
    step 4-6 losses."""
    config = _config(tmp_path, shards, base_ckpt, run="resumed")
    _fit(config, "--resume", str(trained / "checkpoints" / f"step{CHECKPOINT_AT:07d}.ckpt"))
    want = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert sorted(got["state_dict"]) == sorted(want["state_dict"])
    assert all(torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())
    assert all(torch.equal(a, b) for a, b in zip(got["callbacks"]["EMA"]["shadow"], want["callbacks"]["EMA"]["shadow"]))
    straight, resumed = _losses(trained), _losses(tmp_path / "resumed")
    later = [s for s in straight if s >= CHECKPOINT_AT]
    assert later and all(resumed[s] == straight[s] for s in later), (straight, resumed)


def test_a_lora_checkpoint_missing_an_adapter_is_refused(trained: Path, tmp_path: Path) -> None:
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    dropped = next(k for k in ckpt["state_dict"] if is_lora_key(k))
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="1 missing key"):
        load(tmp_path / "broken.ckpt")
    ckpt["state_dict"][dropped.replace("lora_A", "lora_Z")] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "broken2.ckpt")
    with pytest.raises(CheckpointError, match="unexpected key"):
        load(tmp_path / "broken2.ckpt")
