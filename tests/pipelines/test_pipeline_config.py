"""model.pretrained: what a pipeline folder sets in the config, what the user keeps, what is refused."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Dict

import pytest

from mmdiff.cli import main
from mmdiff.config import load_config, save_config
from mmdiff.config.pipeline import read_pipeline_info
from mmdiff.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_pipelines import IMAGE_SIZE, pipeline_config  # noqa: E402


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_and_components_are_read(family: str, pipeline_folders: Dict[str, Path]) -> None:
    info = read_pipeline_info(pipeline_folders[family])
    assert info.family == family
    assert len(info.text_encoders) == (2 if family == "sdxl" else 1)
    assert info.force_zeros_for_empty_prompt == (family == "sdxl")
    pads = [t.pad_token for t in info.text_encoders]
    assert pads == {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[family]
    assert [t.with_projection for t in info.text_encoders][-1] == (family == "sdxl")
    assert info.image_size == IMAGE_SIZE


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_pipeline_values_fill_the_config(family: str, tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    cfg = load_config(pipeline_config(tmp_path, pipeline_folders[family]))
    assert cfg.diffusion.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert (cfg.diffusion.beta_schedule, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert cfg.model.vae.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert cfg.data.image_size == IMAGE_SIZE  # U-Net sample_size 8 × VAE factor 2
    s = cfg.sampling
    assert (s.sampler, s.timestep_spacing, s.steps_offset, s.set_alpha_to_one) == ("ddim", "leading", 1, False)
    assert list(cfg.model.unet.block_out_channels) == [32, 64]
    assert cfg.model.unet.use_linear_projection == (family != "sd1")


def test_user_keys_win_over_the_pipeline(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    path = pipeline_config(tmp_path, pipeline_folders["sd1"], data={"image_size": 32},
                           sampling={"steps_offset": 0, "sampler": "euler", "steps": 2})
    cfg = load_config(path, ["diffusion.prediction_type=v_prediction", "model.vae.scaling_factor=0.5"])
    assert cfg.diffusion.prediction_type == "v_prediction"  # fine-tuning into v-prediction
    assert (cfg.data.image_size, cfg.sampling.steps_offset, cfg.sampling.sampler) == (32, 0, "euler")
    assert cfg.model.vae.scaling_factor == 0.5
    assert cfg.sampling.set_alpha_to_one is False  # not set by the user: the pipeline's


def test_mmdiff_config_prints_the_pipeline_values(tmp_path: Path, pipeline_folders: Dict[str, Path], capsys) -> None:
    assert main(["config", str(pipeline_config(tmp_path, pipeline_folders["sd2"]))]) == 0
    out = capsys.readouterr().out
    assert "prediction_type: v_prediction" in out and "scaling_factor: 0.18215" in out
    assert f"pretrained: {pipeline_folders['sd2']}" in out


@pytest.mark.parametrize("key,value", [
    ("model.unet.block_out_channels", "[64,128]"),
    ("model.unet.pretrained", "/somewhere/unet"),
    ("model.vae.pretrained", "/somewhere/vae"),
    ("model.clip.pretrained", "laion2b_s32b_b79k"),
    ("model.clip.text_layer", "penultimate"),
])
def test_contradicting_keys_are_refused(key: str, value: str, tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=rf"^{key} cannot be set together with model.pretrained") as err:
        load_config(pipeline_config(tmp_path, pipeline_folders["sd1"]), [f"{key}={value}"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_saved_run_config_loads_again(family: str, tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    """RUN_DIR/config.yaml repeats every key (defaults, the folder's values): no contradiction."""
    cfg = load_config(pipeline_config(tmp_path, pipeline_folders[family]), ["diffusion.prediction_type=v_prediction"])
    saved = save_config(cfg, tmp_path / "run")
    again = load_config(saved)
    assert again == cfg and again.diffusion.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match=r"^model.unet.block_out_channels cannot be set"):
        load_config(saved, ["model.unet.block_out_channels=[64,128]"])


def test_learned_variance_is_refused(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="learned_range"):
        load_config(pipeline_config(tmp_path, pipeline_folders["sd1"]), ["diffusion.variance_type=learned_range"])


def test_pretrained_is_only_for_text_to_image(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="only for the text_to_image system"):
        load_config(pipeline_config(tmp_path, pipeline_folders["sd1"]), ["system=captioning"])


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy", ignore=shutil.ignore_patterns("*.safetensors")))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _one_line_error(tmp_path: Path, folder: Path, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as err:
        load_config(pipeline_config(tmp_path, folder))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unsupported_pipeline_class(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    folder = _copy(pipeline_folders["sd1"], tmp_path)
    _edit_json(folder / "model_index.json", _class_name="FluxPipeline")
    message = _one_line_error(tmp_path, folder, "is a FluxPipeline; supported are StableDiffusionPipeline")
    assert str(folder / "model_index.json") in message


def test_missing_component_folder(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    folder = _copy(pipeline_folders["sdxl"], tmp_path)
    shutil.rmtree(folder / "text_encoder_2")
    assert str(folder / "text_encoder_2") in _one_line_error(tmp_path, folder, "has no .* folder")


def test_missing_model_index_and_folder(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    folder = _copy(pipeline_folders["sd1"], tmp_path)
    (folder / "model_index.json").unlink()
    assert str(folder / "model_index.json") in _one_line_error(tmp_path, folder, "has no model_index.json")
    _one_line_error(tmp_path, tmp_path / "nowhere", "is not a folder")
    single = tmp_path / "sd15.safetensors"
    single.write_bytes(b"")
    _one_line_error(tmp_path, single, "is a single-file checkpoint; convert it .*from_single_file")


def test_schedule_mmdiff_cannot_express(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    folder = _copy(pipeline_folders["sd1"], tmp_path)
    _edit_json(folder / "scheduler" / "scheduler_config.json", beta_schedule="exponential")
    _one_line_error(tmp_path, folder, "beta_schedule 'exponential', which mmdiff cannot express")


def test_trained_betas_become_a_custom_schedule(tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    folder = _copy(pipeline_folders["sd1"], tmp_path)
    betas = [0.0001 + i * 1e-5 for i in range(1000)]
    _edit_json(folder / "scheduler" / "scheduler_config.json", trained_betas=betas)
    cfg = load_config(pipeline_config(tmp_path, folder))
    assert cfg.diffusion.beta_schedule == "custom" and list(cfg.diffusion.betas) == pytest.approx(betas)
