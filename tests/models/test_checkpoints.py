"""Safe loading: weights_only torch.load, state-dict files, strict loading with readable errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mmdiff.io.weights import load_state_dict_file, load_strict, safe_torch_load
from mmdiff.errors import CheckpointError


class _WritesAFile:
    """A pickle payload that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _WritesAFile(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused for safety") as err:
        safe_torch_load(evil)
    assert str(evil) in str(err.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_state_dict_file(evil)
    assert not marker.exists()


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        safe_torch_load(missing)
    assert str(missing) in str(err.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        safe_torch_load(garbage)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a valid .safetensors"):
        load_state_dict_file(bad_st)


def test_state_dict_files_of_each_kind(tmp_path: Path) -> None:
    state = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "global_step": 7, "hyper_parameters": {"x": [1]}}, tmp_path / "w.ckpt")
    for name in ("w.safetensors", "w.pt", "w.ckpt"):
        loaded = load_state_dict_file(tmp_path / name)
        assert set(loaded) == set(state)
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_state_dict_file(tmp_path / "list.pt")


def test_load_strict_reports_keys_and_leaves_module_unchanged() -> None:
    module = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    bad = {"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3), "extra.w": torch.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        load_strict(module, bad, "Toy")
    text = str(err.value)
    assert text.startswith("Toy weights do not fit")
    assert "2 missing key(s) (1.weight, 1.bias)" in text
    assert "1 unexpected key(s) (extra.w)" in text
    assert "0.weight (3, 5) vs (3, 2)" in text
    assert "\n" not in text
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    good = {k: torch.ones_like(v) for k, v in before.items()}
    load_strict(module, {**good, "logit_bias": torch.zeros(1)}, "Toy", ignore_keys=("logit_*",))
    assert all(torch.equal(v, torch.ones_like(v)) for v in module.state_dict().values())
    partial = {k: v for k, v in good.items() if k != "1.bias"}
    load_strict(module, partial, "Toy", ignore_keys=("1.bias",))
