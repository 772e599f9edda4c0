"""Config fuzzing: every top-level section gets wrong types, unknown keys, non-mappings and absurd
values, from the command line and from YAML; each is one ConfigError line before anything runs
(and ``mmdiff config`` exits 2 with one line on stderr), never a traceback."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig

from mmdiff.cli import main
from mmdiff.config import load_config, schema
from mmdiff.errors import ConfigError

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from mmdiff.cli import main; sys.exit(main())"  # what the `mmdiff` script runs


def _leaves(node: DictConfig, prefix: str = "") -> List[str]:
    out: List[str] = []
    for key in node.keys():
        child = node._get_node(key)
        dotted = f"{prefix}{key}"
        out += _leaves(child, f"{dotted}.") if isinstance(child, DictConfig) else [dotted]
    return out


SCHEMA = schema()
SECTIONS = [k for k in SCHEMA.keys() if isinstance(SCHEMA._get_node(k), DictConfig)]
LEAVES = {s: [k for k in _leaves(SCHEMA) if k.startswith(f"{s}.")] for s in SECTIONS}
LEAVES["top"] = [k for k in SCHEMA.keys() if k not in SECTIONS]

# Override values: numbers of every size and sign, NaN/Inf, YAML and interpolation fragments, text.
TEXT_VALUES = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.booleans().map(str),
    st.sampled_from(["null", "", "[]", "{}", "[1, 2]", "[a, 1]", "{a: 1}", "???", "${nope}", "${",
                     "[", "{", "'", '"', "-", "0", "-1", "1e309", "abc", "a b", "${oc.env:NO_SUCH_VAR}",
                     "=", "::", "*", "&a", "!!python/object:os.system", "${data.image_size}"]),
    st.text(max_size=12),
)
# YAML values: anything safe_dump can write.
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def base_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "x.yaml"
    path.write_text("name: fuzz\n")
    return path


def _outcome(path: Path, overrides: List[str]) -> Tuple[str, str]:
    """("ok", "") or ("error", message); anything but a ConfigError fails the test."""
    try:
        load_config(path, overrides)
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message, repr(message)
        return "error", message
    return "ok", ""


def _cli(args: List[str]) -> Tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()


def _override_property(base_yaml: Path, data, sections: List[str]) -> None:
    section = data.draw(st.sampled_from(sections), label="section")
    key = data.draw(st.sampled_from(LEAVES[section]), label="key")
    value = data.draw(TEXT_VALUES, label="value")
    code, err = _cli(["config", str(base_yaml), f"{key}={value}"])  # anything but MmdiffError raises
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, repr(err)


def _yaml_property(tmp_path: Path, data, sections: List[str]) -> None:
    section = data.draw(st.sampled_from(sections), label="section")
    key = data.draw(st.sampled_from(LEAVES[section]), label="key")
    tree: Any = data.draw(YAML_VALUES, label="value")
    for part in reversed(key.split(".")):
        tree = {part: tree}
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    _outcome(path, [])


def _unknown_property(base_yaml: Path, data, sections: List[str]) -> None:
    section = data.draw(st.sampled_from(sections), label="section")
    known = {k.split(".")[1] for k in LEAVES[section]}
    name = data.draw(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True).filter(lambda n: n not in known))
    status, message = _outcome(base_yaml, [f"{section}.{name}=1"])
    assert status == "error" and message.startswith(f"unknown key '{section}.{name}'")
    scalar = data.draw(st.sampled_from(["1", "abc", "[1]", "null", "true"]))
    status, message = _outcome(base_yaml, [f"{section}={scalar}"])
    assert status == "error", f"{section}={scalar} was accepted"


QUICK = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
THOROUGH = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@QUICK
@given(data=st.data())
def test_any_override_is_ok_or_one_line_exit_2(base_yaml: Path, data) -> None:
    _override_property(base_yaml, data, SECTIONS + ["top"])


@QUICK
@given(data=st.data())
def test_any_yaml_value_loads_or_is_one_config_error(tmp_path: Path, data) -> None:
    _yaml_property(tmp_path, data, SECTIONS + ["top"])


@QUICK
@given(data=st.data())
def test_unknown_keys_and_non_mappings_are_errors(base_yaml: Path, data) -> None:
    _unknown_property(base_yaml, data, SECTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("section", SECTIONS + ["top"])
@THOROUGH
@given(data=st.data())
def test_every_section_fuzzed_thoroughly(section: str, base_yaml: Path, tmp_path: Path, data) -> None:
    _override_property(base_yaml, data, [section])
    _yaml_property(tmp_path, data, [section])
    if section != "top":
        _unknown_property(base_yaml, data, [section])


ABSURD = [
    "optim.lr=-1", "optim.lr=0", "optim.lr=nan", "optim.lr=inf", "optim.eps=0", "optim.betas=[1.5,0.9]",
    "optim.betas=[0.9]", "optim.weight_decay=-0.1", "optim.warmup_steps=-1", "optim.min_lr_ratio=2",
    "data.batch_size=0", "data.batch_size=-8", "data.image_size=31", "data.image_size=0",
    "data.num_workers=-1", "data.steps_per_epoch=0", "data.val_batch_size=0",
    "trainer.max_steps=0", "trainer.precision=fp33", "trainer.accelerator=abacus", "trainer.devices=many",
    "trainer.num_nodes=0", "trainer.accumulate_grad_batches=0", "trainer.val_every_n_steps=0",
    "trainer.log_every_n_steps=0", "trainer.checkpoint_every_n_steps=0", "trainer.keep_last_n=-2",
    "trainer.max_bad_steps=0", "trainer.gradient_clip_val=-1", "trainer.limit_val_batches=-1",
    "trainer.strategy=magic", "trainer.probe_resources_every_n_steps=-1",
    "sampling.steps=0", "sampling.steps=5000", "sampling.every_n_steps=-1", "sampling.sampler=fast",
    "diffusion.num_train_timesteps=1", "diffusion.beta_start=0.5", "model.ema_decay=1",
    "model.caption_dropout=2", "model.vae.block_out_channels=[]", "model.unet.norm_num_groups=7",
    "model.caption.width=10", "seed=-1", "seed=99999999999", "system=nope", "logger.kind=stdout",
]


@pytest.mark.parametrize("override", ABSURD)
def test_absurd_values_are_one_line_errors(base_yaml: Path, override: str) -> None:
    status, message = _outcome(base_yaml, [override])
    assert status == "error", f"{override} was accepted"
    key = override.split("=")[0]
    assert key.split(".")[-1] in message or "system" in message, message


def test_the_real_cli_exits_2_with_one_line(base_yaml: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for override in ("data.batch_size=[", "optim.lr=-1", "data=5", "logger.tags={a: 1}"):
        result = subprocess.run([sys.executable, "-c", CLI, "config", str(base_yaml), override],
                                capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2, (override, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
