"""`mmdiff export` of a model fine-tuned from model.pretrained: the source family's own pipeline.

Fine-tune each tiny pipeline for 3 steps, export the checkpoint, and
``DiffusionPipeline.from_pretrained(OUT)`` is the source's class (StableDiffusionPipeline for SD
1.x/2.x, StableDiffusionXLPipeline for SDXL) whose DDIM output (same seed, x_T drawn as mmdiff draws
it, guidance, SDXL's default ids) equals ``mmdiff.load(ckpt).sample`` within 1e-4, latents and
images. A trained text encoder (``model.clip.freeze=false``) leaves with its new weights; a frozen
one leaves exactly as the source pipeline had it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

import mmdiff
from mmdiff.cli import main
from mmdiff.errors import UsageError
from mmdiff.inference.export import export_folder, export_single_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_pipelines import PARITY_PROMPTS, diffusers_ddim, fine_tune, mmdiff_ddim  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def _text_weights(folder: Path, encoder: str) -> Dict[str, torch.Tensor]:
    return load_file(str(folder / encoder / "model.safetensors"))


@pytest.mark.parametrize("family, train_text", [("sd1", False), ("sd2", True), ("sdxl", True)])
def test_fine_tuned_pipeline_exports_as_its_family(family: str, train_text: bool, tmp_path: Path,
                                                    pipeline_folders: Dict[str, Path], demo_shards: Path) -> None:
    from diffusers import DDIMScheduler, DiffusionPipeline

    source = pipeline_folders[family]
    ckpt = fine_tune(tmp_path, source, demo_shards, model={"clip": {"freeze": not train_text}})
    system = mmdiff.load(ckpt, device="cpu")
    if train_text:  # the fine-tune itself moved the text encoders (model.clip.freeze=false trains them)
        for index_, encoder in enumerate(ENCODERS[family]):
            source_embedding = next(v for k, v in _text_weights(source, encoder).items()
                                    if k.endswith("embeddings.token_embedding.weight"))
            assert not torch.equal(system.clip.towers[index_].token_embedding.weight.detach(), source_embedding)
        # Whatever the optimiser did to the text encoder, move every weight (LayerNorms too, away
        # from their (1, 0) init, so a dropped one shows): the export must carry what the system holds.
        with torch.no_grad():
            for p in system.clip.parameters():
                p.add_(0.05 * torch.randn_like(p))
    out = export_folder(system, tmp_path / "export", ckpt=str(ckpt))

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe) is type(DiffusionPipeline.from_pretrained(str(source)))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    index = json.loads((out / "model_index.json").read_text())
    if family == "sdxl":
        assert index["force_zeros_for_empty_prompt"] is True and pipe.config.force_zeros_for_empty_prompt
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    else:
        assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    assert not (out / "open_clip").exists()
    info = json.loads((out / "mmdiff.json").read_text())
    assert info["pipeline"] and info["pipeline_family"] == family
    assert {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x",
            "sdxl": "Stable Diffusion XL"}[family] in (out / "README.md").read_text()

    # the exported tokenizers give the ids mmdiff trained with (padding as the source's)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    ids = system.clip.tokenize(PARITY_PROMPTS)
    for index_, tok in enumerate(tokenizers):
        theirs = tok(PARITY_PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
        assert torch.equal(theirs, ids[:, index_])

    # text encoders: trained ones leave with their new weights, frozen ones exactly as the source's
    for encoder in ENCODERS[family]:
        ours, theirs = _text_weights(out, encoder), _text_weights(source, encoder)
        assert set(ours) == set(theirs)
        same = all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert same != train_text, f"{encoder}: trained={train_text} but same weights={same}"

    latents, images = mmdiff_ddim(system)
    want_latents, want_images = diffusers_ddim(pipe)
    assert latents.shape == want_latents.shape and float(want_latents.std()) > 0.1
    assert (latents - want_latents).abs().max() < 1e-4
    assert (images - want_images).abs().max() < 1e-4


def test_export_cli_and_single_file_refusal(tmp_path: Path, pipeline_folders: Dict[str, Path],
                                            demo_shards: Path) -> None:
    """`mmdiff export` writes the family's folder; --format safetensors is refused in one line."""
    ckpt = fine_tune(tmp_path, pipeline_folders["sd2"], demo_shards, trainer={"max_steps": 1})
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    tokenizer = json.loads((out / "tokenizer" / "special_tokens_map.json").read_text())
    assert tokenizer["pad_token"] == "!"  # SD 2.x pads with "!", as its source
    with pytest.raises(UsageError, match="--format diffusers"):
        export_single_file(mmdiff.load(ckpt, device="cpu"), tmp_path / "model.safetensors")
