"""LoRA on an imported SD 1.x / 2.x / XL pipeline: fit 3 steps with U-Net and text-encoder adapters,
the checkpoint holds only adapters (+ buffers), mmdiff.load rebuilds the base from the folder,
resume continues, and ``mmdiff export --lora`` writes a file diffusers' own pipeline loads with
``load_lora_weights`` to sample exactly what mmdiff samples (DDIM, same seed, initial latents and
guidance, SDXL's default size ids).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, NamedTuple

import pytest
import torch
from safetensors import safe_open

import mmdiff
from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.inference.lora_export import WEIGHT_NAME, merged_copy
from mmdiff.models.lora import is_lora_key
from mmdiff.systems.text_to_image import TextToImageSystem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_pipelines import diffusers_ddim, mmdiff_ddim, pipeline_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("sd1", "sd2", "sdxl")
RANK, ALPHA = 4, 8.0  # alpha != rank: the file's metadata must carry the scale
LORA = {"rank": RANK, "alpha": ALPHA, "text_encoder": True}
COMPONENTS = {"sd1": ("unet", "text_encoder"), "sd2": ("unet", "text_encoder"),
              "sdxl": ("unet", "text_encoder", "text_encoder_2")}


class Run(NamedTuple):
    config: Path
    ckpt: Path
    folder: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, pipeline_folders: Dict[str, Path], demo_shards: Path):
    """``family -> Run``: a 3-step LoRA fine-tune of each tiny pipeline, fitted on first use."""
    done: Dict[str, Run] = {}

    def get(family: str) -> Run:
        if family not in done:
            root = tmp_path_factory.mktemp(f"lora_{family}")
            config = pipeline_config(root, pipeline_folders[family], demo_shards,
                                     model={"pretrained": str(pipeline_folders[family]), "ema_decay": 0.9,
                                            "caption_dropout": 0.25, "lora": LORA},
                                     # 3 steps at a large, constant LR move the adapters' B (zero
                                     # at init) far enough to change samples, and a resume past
                                     # max_steps still has a nonzero LR.
                                     optim={"warmup_steps": 1, "lr": 1e-2, "schedule": "constant"})
            torch.set_num_threads(1)
            assert main(["fit", str(config)]) == 0
            done[family] = Run(config, root / "run" / "checkpoints" / "last.ckpt", pipeline_folders[family])
        return done[family]

    return get


def _pipeline(folder: Path, lora: Path | None = None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_checkpoint_holds_adapters_and_loads_from_the_folder(family: str, runs) -> None:
    run = runs(family)
    state = torch.load(run.ckpt, weights_only=True)["state_dict"]
    base = [k for k in state if k.startswith(("unet.", "clip.", "vae.")) and not is_lora_key(k)]
    assert not base, f"base weights in a LoRA checkpoint: {base[:5]}"
    text = [k for k in state if k.startswith("clip.") and is_lora_key(k)]
    towers = {k.split(".")[2] for k in text}
    assert towers == ({"0", "1"} if family == "sdxl" else {"0"})
    assert "latent_scale" in state

    loaded = mmdiff.load(run.ckpt, use_ema=False, device="cpu")
    assert loaded.global_step_loaded == 3 and loaded.lora is not None
    trained = [k for k in text if ".lora_B." in k and state[k].abs().max() > 0]
    assert trained, "the text-encoder adapters did not train"
    # The trained system as training left it: base from the folder + the checkpoint's weights.
    rebuilt = TextToImageSystem(load_config(run.config))
    rebuilt.load_state_dict(state, strict=False)
    rebuilt.eval()
    a, _ = mmdiff_ddim(loaded)
    b, _ = mmdiff_ddim(rebuilt)
    assert float((a - b).abs().max()) < 1e-5
    plain = TextToImageSystem(load_config(run.config, ["model.lora.rank=0"])).eval()
    c, _ = mmdiff_ddim(plain)
    assert float((a - c).abs().max()) > 1e-3, "the adapters do not change the samples"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_export_samples_as_mmdiff_in_the_diffusers_pipeline(family: str, runs, tmp_path: Path) -> None:
    run = runs(family)
    out = tmp_path / "lora"
    assert main(["export", str(run.ckpt), "--lora", str(out)]) == 0
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == set(COMPONENTS[family])
    for component in COMPONENTS[family][1:]:  # transformers CLIPTextModel names
        text = [k for k in keys if k.startswith(f"{component}.")]
        assert text and all(k.startswith(f"{component}.text_model.encoder.layers.") for k in text)
        assert {k.split(".")[5] for k in text} == {"self_attn", "mlp"}
    for component in COMPONENTS[family]:
        assert meta[f"{component}.r"] == RANK and meta[f"{component}.lora_alpha"] == ALPHA

    system = mmdiff.load(run.ckpt, device="cpu")  # EMA weights, as the export
    latents, images = mmdiff_ddim(system)
    pipe = _pipeline(run.folder, out)
    want_latents, want_images = diffusers_ddim(pipe)
    assert float(want_latents.std()) > 0.1
    assert float((latents - want_latents).abs().max()) < 1e-4
    assert float((images - want_images).abs().max()) < 1e-4
    base_latents, _ = diffusers_ddim(_pipeline(run.folder))
    assert float((base_latents - want_latents).abs().max()) > 1e-3, "the LoRA file changes nothing"

    merged = merged_copy(system)  # what `mmdiff export --out` writes: adapters folded in
    merged_latents, _ = mmdiff_ddim(merged)
    assert merged.lora is None and not [k for k in merged.state_dict() if is_lora_key(k) or ".base_layer." in k]
    assert float((merged_latents - latents).abs().max()) < 1e-4


def test_lora_resume_continues_from_the_adapters(runs, tmp_path: Path) -> None:
    run = runs("sdxl")
    assert main(["fit", str(run.config), f"run_dir={tmp_path / 'resumed'}", "trainer.max_steps=4",
                 "--resume", str(run.ckpt)]) == 0
    ckpt = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    before = torch.load(run.ckpt, weights_only=True)
    after = torch.load(ckpt, weights_only=True)
    assert after["global_step"] == 4 and set(after["state_dict"]) == set(before["state_dict"])
    moved = [k for k, v in before["state_dict"].items() if is_lora_key(k) and not torch.equal(v, after["state_dict"][k])]
    assert moved
    adam = after["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 4 for s in adam.values())  # the optimiser state continued, not restarted
    assert mmdiff.load(ckpt, device="cpu").global_step_loaded == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_parameter_gets_a_gradient(family: str, tmp_path: Path, pipeline_folders: Dict[str, Path]) -> None:
    """DDP refuses a parameter that requires grad and gets none: under LoRA with text adapters
    every trainable parameter (U-Net and text adapters, both SDXL towers) gets one in one step."""
    config = pipeline_config(tmp_path, pipeline_folders[family], model={"pretrained": str(pipeline_folders[family]),
                                                                        "caption_dropout": 0.0, "lora": LORA})
    model = TextToImageSystem(load_config(config))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(f".{n}") for n in trainable)
    towers = {n.split(".")[2] for n in trainable if n.startswith("clip.")}
    assert towers == ({"0", "1"} if family == "sdxl" else {"0"})
    size = int(model.cfg.data.image_size)
    batch = {"image": torch.rand(2, 3, size, size) * 2 - 1, "caption": ["a handwritten digit one", "seven"]}
    model.latent_scale.fill_(1.0)
    model.train()
    model._loss(batch)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_folder_samples_as_mmdiff(family: str, runs, tmp_path: Path) -> None:
    """``mmdiff export CKPT --out DIR`` of a LoRA fine-tune: the source family's pipeline with the
    adapters (U-Net and every text tower) folded in, sampling what mmdiff samples."""
    run = runs(family)
    out = tmp_path / "merged"
    assert main(["export", str(run.ckpt), "--out", str(out)]) == 0
    assert json.loads((out / "mmdiff.json").read_text())["lora_merged"] is True
    latents, images = mmdiff_ddim(mmdiff.load(run.ckpt, device="cpu"))
    want_latents, want_images = diffusers_ddim(_pipeline(out))
    assert float((latents - want_latents).abs().max()) < 1e-4
    assert float((images - want_images).abs().max()) < 1e-4
