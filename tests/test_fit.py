"""`mmdiff fit` wiring with a minimal registered system: run dir, config, checkpoints, loggers."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import mmdiff.run.training
from mmdiff.cli import main
from mmdiff.systems.optim import lr_lambda
from mmdiff.systems.registry import get_system

import tiny_configs
from tiny_configs import ToySystem, add_fit_callback  # registers the toy system


@pytest.fixture
def toy_config(tmp_path: Path, demo_shards: Path) -> Path:
    return tiny_configs.toy_config(tmp_path, demo_shards, data={"batch_size": 16}, trainer={"limit_val_batches": 2})


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


def test_no_progress_line_before_the_first_step_of_a_start(toy_config: Path, caplog) -> None:
    """With accumulation the first batch of a start (fresh or resumed) ends at the start step, nothing
    trained yet: no "0.00 steps/s" line for it."""
    overrides = ["trainer.accumulate_grad_batches=2", "trainer.checkpoint_every_n_steps=2"]
    with caplog.at_level("INFO", logger="mmdiff.progress"):
        assert main(["fit", str(toy_config), "trainer.max_steps=2", *overrides]) == 0
        assert main(["fit", str(toy_config), "trainer.max_steps=4", *overrides]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "mmdiff.progress"]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2", "3/4", "4/4"], lines


class RecordLR(L.Callback):
    """The LR each optimiser step uses, by step."""

    def __init__(self) -> None:
        self.lrs: dict = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


def test_resume_follows_the_configs_lr_schedule_from_the_restored_step(toy_config: Path, monkeypatch) -> None:
    """Raising trainer.max_steps (or changing optim.lr) on a resume: the new schedule at the restored step,
    not the old one's LR (0 at the end of a cosine to min_lr_ratio 0) for the first step."""
    recorders = []

    def with_recorder(*args, **kwargs):
        recorders.append(RecordLR())
        return [*build_callbacks(*args, **kwargs), recorders[-1]]

    build_callbacks = mmdiff.run.training.build_callbacks
    monkeypatch.setattr(mmdiff.run.training, "build_callbacks", with_recorder)
    for max_steps, lr in ((6, 0.01), (12, 0.01), (14, 0.02)):
        assert main(["fit", str(toy_config), f"trainer.max_steps={max_steps}", f"optim.lr={lr}"]) == 0
    expected = [{s: lr * lr_lambda(s, 0, total, "cosine", 0.0) for s in steps}
                for steps, total, lr in ((range(6), 6, 0.01), (range(6, 12), 12, 0.01), (range(12, 14), 14, 0.02))]
    assert [r.lrs for r in recorders] == [pytest.approx(e) for e in expected]


def test_sigterm_stop_exits_143(toy_config: Path, monkeypatch, capsys) -> None:
    """Lightning ends a SIGTERM'd fit with a bare SystemExit (status 0); mmdiff exits 128 + 15."""
    import os
    import signal

    class Terminate(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    add_fit_callback(monkeypatch, Terminate())
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
    record = _RecordValidation()
    add_fit_callback(monkeypatch, record)
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

    class FrozenPartAndOtherWarnings(L.Callback):
        def setup(self, trainer, pl_module, stage) -> None:
            pl_module.head.eval()  # as a frozen encoder is: Lightning warns about it at the start of training

        def on_train_start(self, trainer, pl_module) -> None:
            warnings.warn("a warning of the user's own", UserWarning)
            warnings.warn_explicit("another Lightning warning", PossibleUserWarning, "fit_loop.py", 1,
                                   module="lightning.pytorch.loops.fit_loop")

    add_fit_callback(monkeypatch, FrozenPartAndOtherWarnings())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", str(toy_config)]) == 0
    messages = [str(w.message) for w in caught]
    assert "a warning of the user's own" in messages and "another Lightning warning" in messages
    assert not [m for m in messages if "in eval mode" in m or "LeafSpec" in m]


# ------------------------------------------------------------------ rerun, --fresh, requeue
def _files(run_dir: Path) -> dict:
    """Bytes of every checkpoint and the config of a run dir."""
    paths = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / "config.yaml"]
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in paths if p.is_file()}


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


def test_rerun_resumes_from_the_newest_checkpoint_and_overwrites_none(toy_config: Path, tmp_path: Path,
                                                                      caplog) -> None:
    run = tmp_path / "run"
    assert main(["fit", str(toy_config), "trainer.max_steps=3", "trainer.keep_last_n=-1"]) == 0
    before = _files(run)
    with caplog.at_level("INFO", logger="mmdiff.run.resume"):
        assert main(["fit", str(toy_config), "trainer.max_steps=6", "trainer.keep_last_n=-1"]) == 0
    assert f"resuming {run} from " in caplog.text and "(step 3)" in caplog.text
    assert _step(run / "checkpoints" / "last.ckpt") == 6
    after = _files(run)
    assert after["checkpoints/step0000003.ckpt"] == before["checkpoints/step0000003.ckpt"]
    assert "checkpoints/step0000006.ckpt" in after
    second = (run / "csv" / "version_1" / "metrics.csv").read_text()
    assert "train/loss" in second  # the second start trained steps 4-6


def test_rerun_of_a_finished_run_ends_at_once(toy_config: Path, tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    assert main(["fit", str(toy_config)]) == 0
    before = _files(run)
    with caplog.at_level("INFO"):
        assert main(["fit", str(toy_config)]) == 0
    assert f"{run} is finished: step 6 of trainer.max_steps=6, nothing to train" in caplog.text
    assert _files(run) == before  # byte for byte, config.yaml included
    assert not (run / "csv" / "version_1").exists()  # no logger, no trainer


def test_fresh_starts_over_and_keeps_the_earlier_run(toy_config: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["fit", str(toy_config), "trainer.max_steps=3", "optim.lr=0.01"]) == 0
    before = _files(run)
    assert main(["fit", str(toy_config), "trainer.max_steps=3", "--fresh"]) == 0
    [moved] = (run / "superseded").iterdir()
    assert _files(moved) == before  # the earlier run, byte for byte
    assert _files(run).keys() == before.keys() and _files(run) != before
    assert _step(run / "checkpoints" / "last.ckpt") == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] != 0.01


def test_fresh_with_resume_is_one_line_usage_error(toy_config: Path, capsys) -> None:
    assert main(["fit", str(toy_config), "--fresh", "--resume", "last"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --fresh starts a new run and --resume continues one; pass only one of them."]


def test_auto_resume_of_another_model_suggests_fresh(toy_config: Path, tmp_path: Path, capsys) -> None:
    assert main(["fit", str(toy_config), "trainer.max_steps=3"]) == 0
    capsys.readouterr()
    assert main(["fit", str(toy_config), "system=autoencoder"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("; or start a new run over it with --fresh."), err


# One task of a SLURM job (Lightning takes the rank from these), first start or requeued.
_SLURM_TASK = {"SLURM_JOB_ID": "4711", "SLURM_JOB_NAME": "train.sbatch", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
               "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
               "SLURM_NODELIST": "localhost"}


def _in_slurm_task(monkeypatch, restart: int) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in {**_SLURM_TASK, "SLURM_RESTART_COUNT": str(restart)}.items():
        monkeypatch.setenv(key, value)


def test_requeued_job_resumes_though_its_command_line_says_fresh(toy_config: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    run = tmp_path / "run"
    _in_slurm_task(monkeypatch, restart=0)
    assert main(["fit", str(toy_config), "trainer.max_steps=3", "--fresh"]) == 0
    before = _files(run)
    _in_slurm_task(monkeypatch, restart=1)
    assert main(["fit", str(toy_config), "--fresh"]) == 0
    assert not (run / "superseded").exists()
    assert _step(run / "checkpoints" / "last.ckpt") == 6
    assert _files(run)["checkpoints/step0000003.ckpt"] == before["checkpoints/step0000003.ckpt"]


def test_incomplete_requeue_checkpoint_is_not_resumed_by_lightning(toy_config: Path, tmp_path: Path,
                                                                   monkeypatch, caplog) -> None:
    """Under SLURM Lightning itself resumes from hpc_ckpt_N.ckpt when fit gets no checkpoint: a
    start that skipped a truncated one must start at step 0, not crash on it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"PK\x03\x04 cut short")
    _in_slurm_task(monkeypatch, restart=1)
    with caplog.at_level("WARNING", logger="mmdiff.run.resume"):
        assert main(["fit", str(toy_config), "trainer.max_steps=3"]) == 0
    assert f"skipping checkpoint {run / 'hpc_ckpt_1.ckpt'}: " in caplog.text
    assert _step(run / "checkpoints" / "last.ckpt") == 3
