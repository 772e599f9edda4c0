"""Sampling options are defined once (mmdiff.diffusion.options.SamplingOptions): the ``sampling:``
config section, the CLI's sampler flags and GaussianDiffusion.sample agree on names and checks, and
the config layer stays torch-free with plain string values."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from mmdiff.cli import build_parser, main
from mmdiff.config import SamplingConfig, from_container, load_config, schema, to_container
from mmdiff.diffusion.options import SamplingOptions, option_names, option_problem
from mmdiff.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG_ONLY = {"prompts", "seed", "every_n_steps", "sizes"}  # previews during training, not sampler options


def _sampling_flags(command: list) -> set:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command[0]]
    for name in command[1:]:
        parser = next(a for a in parser._actions if a.dest.endswith("command")).choices[name]
    section = set(option_names()) | {f.name for f in dataclasses.fields(SamplingConfig)}
    return {a.dest for a in parser._actions if a.dest in section} - CONFIG_ONLY


@pytest.mark.parametrize("command", [["sample"], ["vary"], ["interpolate"], ["eval", "digits"], ["eval", "fid"]])
def test_cli_flags_config_section_and_options_are_one_set(command) -> None:
    options = {f.name for f in dataclasses.fields(SamplingOptions)}
    section = {f.name for f in dataclasses.fields(SamplingConfig)} - CONFIG_ONLY
    assert options == section == set(schema().sampling.keys()) - CONFIG_ONLY
    assert _sampling_flags(command) == options


@pytest.mark.parametrize("name,text,value", [("guidance_rescale", "2", 2.0), ("steps", "0", 0),
                                             ("sampler", "plms", "plms"), ("snr", "0", 0.0)])
def test_an_option_check_says_the_same_from_yaml_and_cli(tmp_path: Path, capsys, name, text, value) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(f"base: [{REPO / 'configs/demo/text_to_image.yaml'}]\nsampling:\n  {name}: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problem = option_problem(name, value)
    assert problem and str(err.value).replace(f"sampling.{name}", name).replace(f" in {path}", "") in (
        problem, f"{name} must be between 1 and the 1000 training timesteps, got {value}.")
    assert main(["sample", "x.ckpt", "--prompt", "a", f"--{name.replace('_', '-')}", text]) == 2
    assert problem.rstrip(".") in capsys.readouterr().err
    with pytest.raises(ValueError, match=problem.split(",")[0].replace("[", r"\[")):
        SamplingOptions().replace(**{name: value}).validate()


def test_a_choice_typo_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("data:\n  crop: centre\n")
    with pytest.raises(ConfigError, match=r"unknown data\.crop 'centre' in .*x\.yaml; choose one of: center, random"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown logger\.kind 'stdout' in the command line"):
        load_config(_empty(tmp_path), ["logger.kind=stdout"])


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("name: empty\n")
    return path


def test_loaded_and_rebuilt_configs_hold_plain_strings(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/demo/text_to_image.yaml")
    again = from_container(to_container(cfg))
    for c in (cfg, again, schema()):
        for value in (c.data.crop, c.logger.kind, c.diffusion.prediction_type, c.model.vae.precision,
                      c.model.unet.compile, c.sampling.timestep_spacing, c.model.caption.head):
            assert type(value) is str, (value, type(value))
    assert str(cfg.logger.mode) == "offline" and str(again.diffusion.beta_schedule) == cfg.diffusion.beta_schedule
    cfg.trainer.max_steps = 3  # assignment after loading keeps working (and keeps int checks)
    with pytest.raises(Exception):
        cfg.trainer.max_steps = "many"


def test_text_to_image_keys_are_refused_for_other_systems(tmp_path: Path) -> None:
    path = _empty(tmp_path)
    for override in ("model.precomputed=true", "model.init_from=x.ckpt", "model.image_embed_conditioning=time"):
        with pytest.raises(ConfigError, match=r"is only for the text_to_image system, not 'prior'"):
            load_config(path, ["system=prior", override])


def test_config_and_options_import_no_torch() -> None:
    code = ("import sys, mmdiff.config, mmdiff.diffusion.options, mmdiff.diffusion; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
