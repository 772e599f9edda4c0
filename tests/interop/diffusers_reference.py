"""Text-to-image sampling from an `mmdiff export` folder with diffusers + open_clip only.

The reference loop of docs/interop.md: no mmdiff import, so it checks that the exported folder
alone says everything needed to reproduce `mmdiff sample`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional

import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch.nn import functional as F


def load_image_tokens(folder: Path) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The exported ``image_tokens/`` map (B×E image embedding → B×N×W context tokens), if any."""
    if not folder.is_dir():
        return None
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))

    def tokens(embed: torch.Tensor) -> torch.Tensor:
        x = F.linear(embed, w["proj.weight"], w["proj.bias"]).view(len(embed), cfg["n_tokens"], cfg["width"])
        return F.layer_norm(x, (cfg["width"],), w["norm.weight"], w["norm.bias"], cfg["layer_norm_eps"])

    return tokens


class ExportedModel:
    def __init__(self, folder: Path, scheduler_cls: type = DDIMScheduler) -> None:
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        self.scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler")
        text = folder / "open_clip"
        self.text_layer = json.loads((text / "open_clip_config.json").read_text())["mmdiff"]["text_layer"]
        self.clip = open_clip.create_model(f"local-dir:{text}").eval()
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{text}")
        self.image_tokens = load_image_tokens(folder / "image_tokens")

    @torch.no_grad()
    def encode(self, prompts: List[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states after ln_final of the trained layer, projected pooled embedding)."""
        tokens = self.tokenizer(prompts)
        inter = self.clip.forward_intermediates(text=tokens, text_indices=2, normalize_intermediates=True)
        states = inter["text_intermediates"][-1 if self.text_layer == "last" else -2]
        return states, self.clip.encode_text(tokens, normalize=False)

    @torch.no_grad()
    def sample(self, prompts: List[str], seed: int, steps: int, guidance_scale: float,
               image_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``image_embeds``: scaled CLIP image embeddings of an unCLIP decoder (zeros when None)."""
        states, pooled = self.encode(prompts)
        empty_states, empty_pooled = self.encode([""] * len(prompts))
        context = torch.cat([empty_states, states])  # unconditional half first
        class_labels = torch.cat([empty_pooled, pooled]) if self.unet.config.class_embed_type else None
        timestep_cond = None
        if self.image_tokens is not None or self.unet.config.time_cond_proj_dim:
            zeros = torch.zeros(len(prompts), pooled.shape[-1])
            embeds = torch.cat([zeros, zeros if image_embeds is None else image_embeds])
            if self.image_tokens is not None:
                context = torch.cat([context, self.image_tokens(embeds)], 1)
            timestep_cond = embeds if self.unet.config.time_cond_proj_dim else None
        # Only DDPMScheduler reads the variance channels of a learned-variance U-Net (as in DeepFloyd IF).
        keep_variance = isinstance(self.scheduler, DDPMScheduler) and self.scheduler.config.variance_type in (
            "learned", "learned_range")
        self.scheduler.set_timesteps(steps)
        c, size = self.unet.config.in_channels, self.unet.config.sample_size
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((len(prompts), c, size, size), generator=generator)
        x = x * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=context, class_labels=class_labels,
                            timestep_cond=timestep_cond).sample
            uncond, cond = out.chunk(2)
            guided = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
            if keep_variance:
                guided = torch.cat([guided, cond[:, c:]], 1)  # the conditional branch's variance
            x = self.scheduler.step(guided, t, x, generator=generator).prev_sample
        return self.vae.decode(x / self.vae.config.scaling_factor).sample.clamp(-1, 1)
