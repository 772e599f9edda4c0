"""Real short `mmdiff fit` runs on faulty shards: they finish, report `data/skipped_*`, and leave
every checkpoint loadable and every input shard unchanged."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from datakit import image_bytes, write_tar
from faultkit import (assert_checkpoints_intact, bomb_png, errors, fingerprints, good, metric_values,
                      toy_config, truncate_tar)
from mmdiff.cli import main

pytestmark = pytest.mark.faults


def _corrupt_mix(root: Path) -> tuple[list[Path], Path]:
    """Two training shards (one with six kinds of bad sample, one truncated) and a val shard."""
    bad = [
        ("notimage", {"jpg": b"<html>404</html>", "txt": b"x"}),
        ("empty", {"png": b"", "txt": b"x"}),
        ("bomb", {"png": bomb_png(), "txt": b"x"}),
        ("latin1", {"jpg": image_bytes(3), "txt": "caf\xe9".encode("latin-1")}),
        ("../escape", {"jpg": image_bytes(4), "txt": b"x"}),
        ("nocaption", {"jpg": image_bytes(5)}),
    ]
    mixed = write_tar(root / "train-000000.tar", [good(0), *bad[:3], good(1), *bad[3:], good(2), good(3)])
    cut = truncate_tar(write_tar(root / "train-000001.tar", [good(i) for i in range(10, 20)]))
    val = write_tar(root / "val-000000.tar", [good(30), bad[0], good(31), bad[1], good(32)])
    return [mixed, cut], val


def test_fit_on_corrupt_shards_finishes_and_reports_skips(tmp_path: Path) -> None:
    train, val = _corrupt_mix(tmp_path / "shards")
    before = fingerprints([*train, val])
    config = toy_config(tmp_path, [str(p) for p in train], [str(val)])
    assert main(["fit", str(config)]) == 0
    run = tmp_path / "run"
    assert_checkpoints_intact(run, steps=6)
    skipped = metric_values(run, "data/skipped_train")
    assert len(skipped) == 6 and skipped == sorted(skipped)  # every step, never decreasing
    assert skipped[-1] >= 6  # the six bad samples of the first shard, at least once
    assert metric_values(run, "data/skipped_val") == [2.0, 2.0]  # two validations, two bad each
    assert fingerprints([*train, val]) == before
    assert not (tmp_path / "escape").exists() and not (tmp_path / "shards" / "escape").exists()


def test_missing_shard_fails_at_start_with_one_line(tmp_path: Path, capsys) -> None:
    write_tar(tmp_path / "train-000000.tar", [good(0), good(1)])
    config = toy_config(tmp_path, [str(tmp_path / "train-{000000..000002}.tar")])
    assert main(["fit", str(config)]) == 1
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "train-000001.tar' does not exist" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before the first step


class _DeleteShardAt(L.Callback):
    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.path.exists():
            self.path.unlink()


def test_shard_disappearing_mid_fit_is_skipped_and_counted(tmp_path: Path, monkeypatch) -> None:
    import mmdiff.run.training as training

    keep = write_tar(tmp_path / "train-000000.tar", [good(i) for i in range(6)])
    gone = write_tar(tmp_path / "train-000001.tar", [good(i) for i in range(10, 16)])
    build = training.build_callbacks
    monkeypatch.setattr(training, "build_callbacks",
                        lambda *a: [*build(*a), _DeleteShardAt(gone, step=2)])
    config = toy_config(tmp_path, [str(keep), str(gone)], max_steps=12)
    assert main(["fit", str(config)]) == 0
    run = tmp_path / "run"
    assert not gone.exists() and keep.is_file()
    assert_checkpoints_intact(run, steps=12)
    skipped = metric_values(run, "data/skipped_train")
    assert skipped[0] == 0 and skipped[-1] >= 2  # the lost shard, once per round after it went
