"""The README.md model card of an exported text-to-image model (config, data, steps, metrics)."""
from __future__ import annotations

import json
from typing import Any, Dict, List

from omegaconf import OmegaConf

_USAGE = '''```python
import open_clip, torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("{dir}", subfolder="unet")
vae = AutoencoderKL.from_pretrained("{dir}", subfolder="vae")
scheduler = DDIMScheduler.from_pretrained("{dir}", subfolder="scheduler")
clip = open_clip.create_model("local-dir:{dir}/open_clip")
tokenizer = open_clip.get_tokenizer("local-dir:{dir}/open_clip")
# text states: see docs/interop.md (ln_final of the {layer} text block) and the pooled
# embedding; call unet(x, t, encoder_hidden_states=states{pooled}).sample
# latents: decode vae.decode(latents / vae.config.scaling_factor)
```'''

_PIPELINE_USAGE = '''```python
from diffusers import DDIMScheduler, DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{dir}")  # StableDiffusionPipeline, DDIM scheduler{offset}
images = pipe(["a prompt"], height={size}, width={size}, guidance_scale={guidance},
              num_inference_steps={steps}).images
```
`text_encoder/` is a transformers `CLIPTextModel` equal to the open_clip text tower (its
`last_hidden_state` is what the U-Net was trained on); `tokenizer/` pads with `!` (id 0) as
open_clip does. The whole open_clip model (with the image tower and the text projection) is in
`open_clip/` (`open_clip.create_model("local-dir:{dir}/open_clip")`).'''


_FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}

_FAMILY_USAGE = '''```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{dir}")  # {pipeline_class}, DDIM scheduler
images = pipe(["a prompt"], height={size}, width={size}, guidance_scale={guidance},
              num_inference_steps={steps}).images
```
Fine-tuned from a {family_name} pipeline (`model.pretrained`); the folder has that pipeline's own
layout: {text_folders}, converted back from the open_clip towers mmdiff trained with.'''


def _family_usage(info: Dict[str, Any], scheduler: Dict[str, Any], size: Any) -> str:
    """Usage for a model fine-tuned from a pipeline folder: the same pipeline class as its source."""
    family = info["pipeline_family"]
    xl = family == "sdxl"
    offset = ""
    if not xl and int(scheduler.get("steps_offset", 1)) != 1:  # StableDiffusionPipeline rewrites it to 1
        offset = ("\n\nThis model samples with steps_offset="
                  f"{scheduler['steps_offset']}, which StableDiffusionPipeline rewrites to 1; set the exported "
                  'scheduler back: `pipe.scheduler = DDIMScheduler.from_pretrained("THIS_FOLDER", '
                  'subfolder="scheduler")`.')
    return _FAMILY_USAGE.format(
        dir="THIS_FOLDER", size=size, guidance=info["guidance_scale"], steps=info["steps"],
        pipeline_class="StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        family_name=_FAMILY_NAMES.get(family, family),
        text_folders="`text_encoder/` + `text_encoder_2/` (hidden_states[-2]) and `tokenizer/` + `tokenizer_2/`"
        if xl else "`text_encoder/` (last_hidden_state) and `tokenizer/`",
    ) + offset


def _text_line(info: Dict[str, Any], cfg: Dict[str, Any], layer: str) -> str:
    """The card's text-encoder line: the source pipeline's encoders, or the open_clip model."""
    family = info.get("pipeline_family")
    if family:
        trained = not cfg.get("model", {}).get("clip", {}).get("freeze", True)
        return (f"- text encoder(s): the {_FAMILY_NAMES.get(family, family)} pipeline's, "
                + ("fine-tuned with the U-Net" if trained else "frozen (as in the source pipeline)"))
    return (f"- text encoder: open_clip `{cfg['model']['clip']['name']}`, token states of the "
            f"`{layer}` layer" + ("; the pooled text embedding is added to the time embedding"
                                  " (diffusers `class_embed_type: projection`, pass it as `class_labels`)"
                                  if info["pooled_text"] else ""))


def _offset_line(scheduler: Dict[str, Any], folder: str) -> str:
    """StableDiffusionPipeline rewrites ``steps_offset`` to 1; other offsets need the scheduler set back."""
    if int(scheduler.get("steps_offset", 1)) == 1:
        return ""
    return ("\n# the pipeline class forces steps_offset=1; this model samples with "
            f"steps_offset={scheduler['steps_offset']}:\n"
            f'pipe.scheduler = DDIMScheduler.from_pretrained("{folder}", subfolder="scheduler")')


def _special_lines(info: Dict[str, Any], scheduler: Dict[str, Any]) -> List[str]:
    """Card lines for what the plain DDIM loop would get wrong: learned variance, EDM, image embeddings."""
    lines = []
    if scheduler.get("variance_type") == "learned_range":
        lines.append("- learned variance: the U-Net outputs 2× the latent channels (mean, then variance);"
                     " `DDPMScheduler` (`variance_type: learned_range`) reads both, DDIM takes the first half")
    if info.get("edm_preconditioning"):
        lines.append("- trained with EDM preconditioning (σ_data = 1); the exported U-Net's `conv_out` is"
                     " negated so that it predicts v (`prediction_type: v_prediction`)")
    mode = info.get("image_embed_conditioning", "none")
    if mode != "none":
        lines.append(f"- unCLIP decoder (`{mode}`): pass the CLIP image embedding scaled to norm √E (zeros"
                     " for the unconditional branch)"
                     + (" as `timestep_cond`" if mode in ("time", "both") else "")
                     + ("; `image_tokens/` turns it into context tokens appended to the text states"
                        if mode in ("tokens", "both") else ""))
    return lines


def model_card(info: Dict[str, Any], scheduler: Dict[str, Any]) -> str:
    """Markdown for ``info`` (see :func:`mmdiff.inference.export.export_info`) and the scheduler config."""
    cfg = info["config"]
    data = cfg.get("data", {})
    metrics = info.get("metrics") or {}
    metric_lines = [f"- **{name}**: `{json.dumps(value, default=str)}`" for name, value in metrics.items()]
    pooled = ", class_labels=pooled" if info["pooled_text"] else ""
    layer = cfg.get("model", {}).get("clip", {}).get("text_layer", "last")
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [text-to-image, mmdiff, latent-diffusion]",
        "---",
        f"# {cfg.get('name', 'mmdiff model')} (text → image latent diffusion, exported by mmdiff)",
        "",
        "## Weights",
        f"- U-Net weights: **{info['weights']}**",
        f"- trained for **{info['global_step']}** optimizer steps"
        + (f" (checkpoint `{info['source_checkpoint']}`)" if info.get("source_checkpoint") else ""),
        f"- latents: {info['latent_shape']} per image, scaled by {info['latent_scale']:.6g}"
        " (stored as the VAE's `scaling_factor`)",
        _text_line(info, cfg, layer),
        f"- scheduler: {scheduler['beta_schedule'] if scheduler.get('trained_betas') is None else 'trained_betas'}"
        f" β, {scheduler['num_train_timesteps']} steps, prediction `{scheduler['prediction_type']}`,"
        f" spacing `{scheduler['timestep_spacing']}` (offset {scheduler['steps_offset']})",
        *_special_lines(info, scheduler),
        f"- sampling defaults: {info['sampler']}, {info['steps']} steps, guidance {info['guidance_scale']}",
        "",
        "## Data",
        f"- train shards: `{data.get('train_shards')}`",
        f"- validation shards: `{data.get('val_shards')}`",
        f"- image size {data.get('image_size')}, batch size {data.get('batch_size')}",
        "",
        "## Metrics",
        *(metric_lines or ["- none recorded (pass `--metrics FILE.json` to `mmdiff export`)"]),
        "",
        "## Use with diffusers",
        _family_usage(info, scheduler, data.get("image_size")) if info.get("pipeline_family") else
        _PIPELINE_USAGE.format(dir="THIS_FOLDER", size=data.get("image_size"), guidance=info["guidance_scale"],
                               steps=info["steps"], offset=_offset_line(scheduler, "THIS_FOLDER"))
        if info.get("pipeline") else _USAGE.format(dir="THIS_FOLDER", layer=layer, pooled=pooled),
        "",
        "## Training config",
        "```yaml",
        OmegaConf.to_yaml(OmegaConf.create(cfg)).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["model_card"]
