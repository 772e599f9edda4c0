"""Config overrides on the command line as ``a.b=c``, ``--a.b=c`` and ``--a.b c`` (what ``wandb agent``
passes), mixed with each command's own flags; errors are one line before any work starts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from mmdiff.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo/text_to_image.yaml")
SWEEP = REPO / "configs/sweeps/t2i_lr.yaml"


def resolved(argv: List[str], capsys) -> Dict[str, Any]:
    """The config ``mmdiff config`` prints for ``argv`` (its arguments after the config path)."""
    assert main(["config", DEMO, *argv]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def one_line_error(argv: List[str], capsys) -> str:
    """The single stderr line of a refused command (exit code 2, nothing on stdout)."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("form", ["plain", "equals", "space"])
def test_three_forms_give_the_same_config(form: str, capsys) -> None:
    pairs = [("optim.lr", "1e-05"), ("model.unet.block_out_channels", "[32, 32]"), ("model.unet.use_pooled_text", "False"),
             ("optim.text_encoder_lr", "null"), ("data.batch_size", "8"), ("seed", "3"),
             ("sampling.prompts", "['a b', 'c']")]
    argv = {"plain": [f"{k}={v}" for k, v in pairs],
            "equals": [f"--{k}={v}" for k, v in pairs],
            "space": [a for k, v in pairs for a in (f"--{k}", v)]}[form]
    cfg = resolved(argv, capsys)
    assert cfg["optim"]["lr"] == 1e-05 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["model"]["unet"]["block_out_channels"] == [32, 32]
    assert cfg["model"]["unet"]["use_pooled_text"] is False
    assert cfg["optim"]["text_encoder_lr"] is None
    assert cfg["data"]["batch_size"] == 8 and cfg["seed"] == 3
    assert cfg["sampling"]["prompts"] == ["a b", "c"]


def _agent_command(values: Dict[str, Any], macro: str) -> List[str]:
    """The argument list ``wandb agent`` runs for one run of configs/sweeps/t2i_lr.yaml, formed with
    wandb's own formatting (create_sweep_command_args) and macro expansion as its agent does it."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(SWEEP.read_text())
    assert set(values) == set(sweep["parameters"])
    variables = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    variables.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    command: List[str] = []
    for chunk in sweep["command"]:  # as wandb_agent.Agent._run_job expands ${...} chunks
        chunk = str(chunk).replace("${args}", "${" + macro + "}")
        command += variables.get(chunk[2:-1]) or [] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


@pytest.mark.parametrize("macro", ["args", "args_no_equals", "args_no_hyphens"])
def test_wandb_agent_arguments_reach_the_config(macro: str, capsys) -> None:
    command = _agent_command({"optim.lr": 0.00031415926, "model.caption_dropout": 0.2}, macro)
    assert command[:4] == ["/usr/bin/env", "python", "-m", "mmdiff.cli"]  # mmdiff/cli/__main__.py
    if macro == "args":
        assert command[-2:] == ["--optim.lr=0.00031415926", "--model.caption_dropout=0.2"]
    assert command[4] == "fit" and command[5] == "configs/demo/text_to_image.yaml"
    assert "--fresh" in command  # one agent runs one run after another in the same run_dir
    # `config` prints what `fit` would train with (and takes fit's overrides, not its flags)
    argv = ["config", str(REPO / command[5]), *[a for a in command[6:] if a != "--fresh"]]
    assert main(argv) == 0, capsys.readouterr().err
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.00031415926 and cfg["model"]["caption_dropout"] == 0.2
    assert cfg["logger"]["mode"] == "online" and cfg["trainer"]["max_steps"] == 500
    assert cfg["run_dir"] == "runs/sweeps/t2i_lr"


def test_wandb_formatting_of_small_floats_lists_and_booleans(capsys) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    values = {"optim.lr": 1e-05, "model.unet.block_out_channels": [32, 32], "model.unet.use_pooled_text": False,
              "optim.weight_decay": 0.0}
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
    assert "--optim.lr=1e-05" in args and "--model.unet.use_pooled_text=False" in args  # Python's str()
    cfg = resolved(args, capsys)
    assert cfg["optim"]["lr"] == 1e-05 and cfg["optim"]["weight_decay"] == 0.0
    assert cfg["model"]["unet"]["block_out_channels"] == [32, 32] and cfg["model"]["unet"]["use_pooled_text"] is False


@pytest.mark.parametrize("argv", [["--trainr.max_steps=3"], ["--trainr.max_steps", "3"], ["trainr.max_steps=3"]])
def test_unknown_key_is_the_config_did_you_mean_error(argv: List[str], capsys) -> None:
    message = one_line_error(["config", DEMO, *argv], capsys)
    assert message == "error: unknown key 'trainr' in the command line — did you mean 'trainer'?"


@pytest.mark.parametrize("argv", [["fit", DEMO, "--trainer.max_steps"],
                                  ["fit", DEMO, "--trainer.max_steps", "--resume", "last"],
                                  ["config", DEMO, "a.b=1", "--trainer.max_steps"],
                                  ["bench", DEMO, "--trainer.max_steps", "--steps=3"]])
def test_key_without_value_is_a_usage_error(argv: List[str], capsys) -> None:
    message = one_line_error(argv, capsys)
    assert "--trainer.max_steps needs a value (--trainer.max_steps=VALUE or --trainer.max_steps VALUE)" in message
    assert f"see mmdiff {argv[0]} --help" in message


def test_command_flags_beside_overrides() -> None:
    parser = build_parser()
    args = parser.parse_args(["fit", "c.yaml", "a.b=1", "--resume", "last", "--c.d", "2", "--e.f=x y", "g=3"])
    assert args.resume == "last" and args.config == "c.yaml"
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=x y", "g=3"]
    args = parser.parse_args(["fit", "c.yaml", "--resume=last", "--optim.lr", "-1e-05"])
    assert args.resume == "last" and args.overrides == ["optim.lr=-1e-05"]  # a negative number is a value
    args = parser.parse_args(["precompute", "c.yaml", "--data.batch_size=4", "--out", "d", "--batch-size", "2",
                              "--split", "val", "--overwrite", "x=1"])
    assert (args.out, args.batch_size, args.split, args.overwrite) == ("d", 2, ["val"], True)
    assert args.overrides == ["data.batch_size=4", "x=1"]
    args = parser.parse_args(["bench", "c.yaml", "--steps", "3", "--optim.lr=1", "--only=train"])
    assert (args.steps, args.only, args.overrides) == (3, "train", ["optim.lr=1"])


@pytest.mark.parametrize("command, flags", [("config", []), ("fit", []), ("precompute", ["--out", "d"]),
                                            ("bench", [])])
def test_every_config_command_reads_all_three_forms(command: str, flags: List[str]) -> None:
    args = build_parser().parse_args([command, "c.yaml", "a.b=1", *flags, "--c.d=2", "--e.f", "3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"]


def test_a_command_flag_wins_over_a_key_of_its_spelling(capsys) -> None:
    args = build_parser().parse_args(["precompute", "c.yaml", "--out=d", "--device", "cpu"])
    assert (args.out, args.device, args.overrides) == ("d", "cpu", [])
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "a flag of this command wins over a config key" in " ".join(capsys.readouterr().out.split())


def test_flags_of_other_commands_are_untouched(capsys) -> None:
    message = one_line_error(["sample", "x.ckpt", "--optim.lr=1"], capsys)
    assert "unrecognized arguments: --optim.lr=1" in message
