"""`mmdiff fit` wiring with a minimal registered system: run dir, config, checkpoints, loggers."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from mmdiff.cli import main
from mmdiff.systems.registry import get_system

from tiny_configs import ToySystem  # registers the toy system


@pytest.fixture
def toy_config(tmp_path: Path, demo_shards: Path) -> Path:
    cfg = {
        "name": "toy",
        "system": "toy",
        "run_dir": str(tmp_path / "run"),
        "data": {
            "train_shards": str(demo_shards / "train-*.tar"),
            "val_shards": str(demo_shards / "val-*.tar"),
            "batch_size": 16,
            "num_workers": 0,
            "steps_per_epoch": 4,
        },
        "trainer": {"max_steps": 6, "accelerator": "cpu", "devices": "1", "val_every_n_steps": 3,
                    "limit_val_batches": 2, "checkpoint_every_n_steps": 3, "log_every_n_steps": 1,
                    "enable_progress_bar": False},
        "logger": {"kind": "csv"},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_registry_knows_toy() -> None:
    assert get_system("toy") is ToySystem
    with pytest.raises(KeyError):
        get_system("no-such-system")


def test_fit_writes_config_checkpoints_and_metrics(toy_config: Path, tmp_path: Path) -> None:
    assert main(["fit", str(toy_config), "optim.lr=0.01"]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01 and saved["system"] == "toy"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6


def test_resume_continues_from_last(toy_config: Path, tmp_path: Path) -> None:
    assert main(["fit", str(toy_config), "trainer.max_steps=3"]) == 0
    assert main(["fit", str(toy_config), "trainer.max_steps=6", "--resume", "last"]) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    first, second = (tmp_path / "run" / "csv" / f"version_{i}" / "metrics.csv" for i in (0, 1))
    assert "train/loss" in first.read_text() and "train/loss" in second.read_text()


def test_resume_from_missing_path_is_one_line_error(toy_config: Path, capsys) -> None:
    assert main(["fit", str(toy_config), "--resume", "nowhere.ckpt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: checkpoint 'nowhere.ckpt' does not exist; pass a .ckpt path or 'last'."]


def _altered_checkpoint(toy_config: Path, tmp_path: Path, alter) -> Path:
    assert main(["fit", str(toy_config), "trainer.max_steps=3"]) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    alter(checkpoint)
    path = tmp_path / "altered.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("alter, message", [
    (lambda c: c["hyper_parameters"]["config"].update(system="autoencoder"),
     "it is a 'autoencoder' checkpoint and this config trains 'toy'."),
    (lambda c: c["state_dict"].update({"head.weight": torch.zeros(1, 4), "extra": torch.zeros(1)}),
     "its weights do not fit this config's model (1 unexpected key(s) (extra); 1 shape mismatch(es) "
     "(head.weight (1, 4) vs (1, 3) in the model)); resume with the config it was trained with."),
])
def test_resume_from_a_checkpoint_of_another_model_is_one_line_error(toy_config: Path, tmp_path: Path, alter,
                                                                     message: str, capsys) -> None:
    path = _altered_checkpoint(toy_config, tmp_path, alter)
    capsys.readouterr()
    assert main(["fit", str(toy_config), "run_dir=" + str(tmp_path / "second"), "--resume", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot resume from '{path}': {message}"]
    assert not (tmp_path / "second").exists()  # refused before the run folder is made


def test_missing_shards_fail_before_the_run_folder_is_made(toy_config: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere" / "train-*.tar"
    assert main(["fit", str(toy_config), f"data.train_shards={missing}"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: data.train_shards: no shard matches '{missing}'; check the pattern."]
    assert not (tmp_path / "run").exists()


def test_progress_is_logged_without_a_progress_bar(toy_config: Path, caplog) -> None:
    with caplog.at_level("INFO", logger="mmdiff.progress"):
        assert main(["fit", str(toy_config), "trainer.log_every_n_steps=3"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "mmdiff.progress"]
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]
    assert all("steps/s" in line and "eta" in line for line in lines)


def test_sigterm_stop_exits_143(toy_config: Path, monkeypatch, capsys) -> None:
    """Lightning ends a SIGTERM'd fit with a bare SystemExit (status 0); mmdiff exits 128 + 15."""
    import os
    import signal

    class Terminate(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    import mmdiff.run.training

    build_callbacks = mmdiff.run.training.build_callbacks
    monkeypatch.setattr(mmdiff.run.training, "build_callbacks", lambda *a, **k: [*build_callbacks(*a, **k), Terminate()])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["fit", str(toy_config)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    assert "stopped by SIGTERM after step" in capsys.readouterr().err


class _RecordValidation(L.Callback):
    def __init__(self) -> None:
        self.steps: list = []

    def on_validation_start(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)


def _validation_steps(toy_config: Path, monkeypatch, *overrides: str) -> list:
    import mmdiff.run.training

    record = _RecordValidation()
    build_callbacks = mmdiff.run.training.build_callbacks
    monkeypatch.setattr(mmdiff.run.training, "build_callbacks", lambda *a, **k: [*build_callbacks(*a, **k), record])
    assert main(["fit", str(toy_config), *overrides]) == 0
    return record.steps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_validation_runs_every_n_optimiser_steps_across_epochs(toy_config: Path, monkeypatch, accumulate: int) -> None:
    """longrun.yaml-like: an epoch (4 batches) shorter than val_every_n_steps (3 optimiser steps with
    accumulation 2, 6 without); validation counts optimiser steps and is not cut to the epoch."""
    every = 3 if accumulate == 2 else 6
    steps = _validation_steps(toy_config, monkeypatch, "data.batch_size=4", "trainer.max_steps=12",
                              f"trainer.val_every_n_steps={every}", f"trainer.accumulate_grad_batches={accumulate}",
                              "trainer.checkpoint_every_n_steps=100")
    assert steps == list(range(every, 13, every))


def test_an_epoch_of_part_accumulation_windows_is_refused(toy_config: Path, capsys) -> None:
    assert main(["fit", str(toy_config), "data.steps_per_epoch=5", "trainer.accumulate_grad_batches=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: data.steps_per_epoch (5) must be a multiple of trainer.accumulate_grad_batches (2)."]


_T2I = ("text_to_image", ["model.vae.pretrained=null", "model.clip.pretrained=null", "model.vae.scale_estimate_batches=1"])


# On for every system (none may reset it), off once: fit sets it before any system is built.
@pytest.mark.parametrize("config, overrides, tf32", [
    (*_T2I, True), ("vae", [], True), ("clip", [], True), ("caption_ar", ["model.clip.pretrained=null"], True),
    ("prior", ["model.clip.pretrained=null"], True), (*_T2I, False),
])
def test_trainer_tf32_reaches_torch_for_every_system(config: str, overrides: list, tf32: bool, tmp_path: Path,
                                                    demo_shards: Path, monkeypatch) -> None:
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    seen: list = []
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: seen.append((matmul.fp32_precision, conv.fp32_precision)))
    start = "ieee" if tf32 else "tf32"  # the opposite of what the run asks for
    matmul.fp32_precision = conv.fp32_precision = start
    try:
        assert main(["fit", str(Path(__file__).resolve().parents[1] / "configs/demo" / f"{config}.yaml"), *overrides,
                     f"run_dir={tmp_path / 'run'}", f"data.train_shards={demo_shards / 'train-*.tar'}",
                     f"data.val_shards={demo_shards / 'val-*.tar'}", "data.num_workers=0", "logger.kind=csv",
                     "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.tf32={str(tf32).lower()}"]) == 0
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
    mode = "tf32" if tf32 else "ieee"
    assert seen == [(mode, mode)]


def test_fit_hides_expected_library_warnings_and_keeps_others(toy_config: Path, monkeypatch) -> None:
    import warnings

    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    import mmdiff.run.training

    class FrozenPartAndOtherWarnings(L.Callback):
        def setup(self, trainer, pl_module, stage) -> None:
            pl_module.head.eval()  # as a frozen encoder is: Lightning warns about it at the start of training

        def on_train_start(self, trainer, pl_module) -> None:
            warnings.warn("a warning of the user's own", UserWarning)
            warnings.warn_explicit("another Lightning warning", PossibleUserWarning, "fit_loop.py", 1,
                                   module="lightning.pytorch.loops.fit_loop")

    build_callbacks = mmdiff.run.training.build_callbacks
    monkeypatch.setattr(mmdiff.run.training, "build_callbacks",
                        lambda *a, **k: [*build_callbacks(*a, **k), FrozenPartAndOtherWarnings()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", str(toy_config)]) == 0
    messages = [str(w.message) for w in caught]
    assert "a warning of the user's own" in messages and "another Lightning warning" in messages
    assert not [m for m in messages if "in eval mode" in m or "LeafSpec" in m]
