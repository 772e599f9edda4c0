"""Typed config loading: base files, overrides, interpolation and one-line early errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmdiff.config import load_config, save_config, to_yaml
from mmdiff.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_closest(tmp_path: Path) -> None:
    cfg = write(tmp_path / "x.yaml", "model:\n  unet:\n    layers_per_blok: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    message = str(err.value)
    assert "unknown key 'model.unet.layers_per_blok'" in message
    assert str(cfg) in message or "x.yaml" in message
    assert "did you mean 'layers_per_block'?" in message


def test_wrong_type_is_an_error(tmp_path: Path) -> None:
    cfg = write(tmp_path / "x.yaml", "data:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(cfg)


def test_enum_value_is_checked(tmp_path: Path) -> None:
    cfg = write(tmp_path / "x.yaml", "diffusion:\n  prediction_type: velocity\n")
    with pytest.raises(ConfigError, match="diffusion.prediction_type"):
        load_config(cfg)


def test_base_files_merge_then_file_then_overrides(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "data:\n  image_size: 64\n  batch_size: 8\nname: a\n")
    write(tmp_path / "b.yaml", "base: [a.yaml]\ndata:\n  batch_size: 16\n")
    cfg = write(tmp_path / "c.yaml", "base: [b.yaml]\nname: c\n")
    loaded = load_config(cfg, ["data.batch_size=4"])
    assert (loaded.data.image_size, loaded.data.batch_size, loaded.name) == (64, 4, "c")
    assert loaded.run_dir == "runs/c"  # ${name} interpolation resolved after overrides


def test_interpolation_across_sections(tmp_path: Path) -> None:
    cfg = write(tmp_path / "x.yaml", "data:\n  image_size: 64\nmodel:\n  clip:\n    arch:\n      vision:\n        image_size: ${data.image_size}\n")
    assert load_config(cfg).model.clip.arch.vision.image_size == 64


def test_single_string_becomes_list(tmp_path: Path) -> None:
    cfg = write(tmp_path / "x.yaml", "data:\n  train_shards: 'shards/train-{000000..000003}.tar'\n")
    loaded = load_config(cfg, ["sampling.prompts=a cat"])
    assert list(loaded.data.train_shards) == ["shards/train-{000000..000003}.tar"]
    assert list(loaded.sampling.prompts) == ["a cat"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.image_size=31", "data.image_size"),
        ("system=nope", "unknown system"),
        ("data.caption_key=caption", "data.caption_key"),
        ("data.random_shift=-1", "data.random_shift"),
        ("data.random_shift=32", "data.random_shift"),
    ],
)
def test_absurd_values_are_errors(tmp_path: Path, override: str, key: str) -> None:
    cfg = write(tmp_path / "x.yaml", "name: x\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(cfg, [override])


def test_unknown_override_key_points_at_command_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "x.yaml", "name: x\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer.max_step' in the command line — did you mean 'max_steps'"):
        load_config(cfg, ["trainer.max_step=3"])


def test_missing_file_and_bad_yaml_and_cycles(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "data: [1, 2\n"))
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(write(tmp_path / "loop.yaml", "base: [loop.yaml]\n"))


def test_saved_config_round_trips(tmp_path: Path) -> None:
    loaded = load_config(REPO / "configs/demo/text_to_image.yaml")
    path = save_config(loaded, tmp_path / "run")
    again = load_config(path)
    assert to_yaml(again) == to_yaml(loaded)
    assert OmegaConf.load(path).model.unet.block_out_channels == list(loaded.model.unet.block_out_channels)


# configs/sweeps/ holds W&B sweep files, not experiment configs (tests/test_cli_overrides.py runs them).
@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                                          if p.parent.name != "sweeps"))
def test_every_shipped_config_loads(config: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    overrides = []
    if OmegaConf.load(REPO / config).get("model", {}).get("pretrained") is not None:
        # A fine-tune config names a pipeline folder another step writes (make demo-finetune exports
        # it); a tiny SD 2.x-style folder of the same layout stands in.
        sys.path.insert(0, str(REPO / "tests" / "pipelines"))
        from tiny_pipelines import save_pipeline

        folder = tmp_path_factory.getbasetemp() / "shipped_pipeline"
        if not folder.exists():
            save_pipeline("sd2", folder)
        overrides.append(f"model.pretrained={folder}")
    load_config(REPO / config, overrides)


def test_cli_unknown_key_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mmdiff.cli", "config", "configs/demo/text_to_image.yaml", "some.unknown=1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: unknown key 'some' in the command line"] or (
        len(lines) == 1 and "unknown key 'some" in lines[0]
    ), proc.stderr


def test_checkpoint_configs_with_renamed_values_still_load() -> None:
    """Checkpoints saved before ``model.unet.compile: off`` became ``none`` rebuild their config."""
    from mmdiff.config import from_container, schema, to_container

    data = to_container(schema())
    data["model"]["unet"]["compile"] = "off"
    assert from_container(data).model.unet.compile == "none"
    assert data["model"]["unet"]["compile"] == "off"  # the caller's dict is left alone


def test_accelerator_and_precision_names_follow_lightning() -> None:
    """The early checks accept exactly what this Lightning accepts (plus the plugin 'hpu')."""
    import typing

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from mmdiff.config import ACCELERATOR_NAMES, PRECISION_NAMES

    lightning_precisions = {str(v) for group in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(group)}
    assert set(PRECISION_NAMES) == lightning_precisions
    assert set(AcceleratorRegistry.available_accelerators()) | {"auto", "gpu"} <= set(ACCELERATOR_NAMES)
    assert set(ACCELERATOR_NAMES) - set(AcceleratorRegistry.available_accelerators()) == {"auto", "gpu", "hpu"}
