"""Full fine-tuning of an imported pipeline: fit a few steps, checkpoint, mmdiff.load without the
folder, same samples; `mmdiff sample` with SDXL's size flags."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

import mmdiff
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.systems.text_to_image import TextToImageSystem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_pipelines import pipeline_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_fine_tune_checkpoint_load_sample(family: str, tmp_path: Path, pipeline_folders: Dict[str, Path],
                                          demo_shards: Path) -> None:
    folder = Path(shutil.copytree(pipeline_folders[family], tmp_path / "pipeline"))
    config = pipeline_config(tmp_path, folder, demo_shards)
    assert main(["fit", str(config)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    original = TextToImageSystem(load_config(config))  # the pipeline's own weights
    shutil.rmtree(folder)  # the checkpoint alone must rebuild the system

    trained = mmdiff.load(ckpt, use_ema=False, device="cpu")
    assert trained.global_step_loaded == 3
    changed = [k for k, v in original.unet.state_dict().items() if not torch.equal(v, trained.unet.state_dict()[k])]
    assert changed, "training did not change the U-Net"
    for name in ("vae", "clip"):  # frozen: exactly the pipeline's
        assert all(torch.equal(v, getattr(trained, name).state_dict()[k])
                   for k, v in getattr(original, name).state_dict().items())
    original.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    original.eval()
    a = trained.sample(["a handwritten digit one", "two"], seed=1, steps=3)
    b = original.sample(["a handwritten digit one", "two"], seed=1, steps=3)
    assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-5
    averaged = mmdiff.load(ckpt, device="cpu")
    assert averaged.ema_loaded


def test_sdxl_sample_cli_takes_size_flags(tmp_path: Path, pipeline_folders: Dict[str, Path], demo_shards: Path) -> None:
    config = pipeline_config(tmp_path, pipeline_folders["sdxl"], demo_shards, trainer={"max_steps": 1})
    assert main(["fit", str(config)]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    common = ["sample", ckpt, "--prompt", "a digit", "--n", "1", "--steps", "2", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "sized"), "--original-size", "64", "48",
                          "--crop-top-left", "4", "2", "--target-size", "32", "32"]) == 0
    plain = (tmp_path / "plain" / "0000.png").read_bytes()
    assert plain != (tmp_path / "sized" / "0000.png").read_bytes()
    system = mmdiff.load(ckpt, device="cpu")
    direct = system.sample(["a digit"], seed=0, steps=2, original_size=(64, 48), crop_top_left=(4, 2),
                           target_size=(32, 32))
    assert torch.isfinite(direct).all()
