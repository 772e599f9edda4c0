"""Text-to-image sampling from an `mmdiff export` folder with diffusers + open_clip only.

The reference loop of docs/interop.md: no mmdiff import, so it checks that the exported folder
alone says everything needed to reproduce `mmdiff sample`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel


class ExportedModel:
    def __init__(self, folder: Path) -> None:
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        self.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        text = folder / "text_encoder"
        self.text_layer = json.loads((text / "open_clip_config.json").read_text())["mmdiff"]["text_layer"]
        self.clip = open_clip.create_model(f"local-dir:{text}").eval()
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{text}")

    @torch.no_grad()
    def encode(self, prompts: List[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states after ln_final of the trained layer, projected pooled embedding)."""
        tokens = self.tokenizer(prompts)
        inter = self.clip.forward_intermediates(text=tokens, text_indices=2, normalize_intermediates=True)
        states = inter["text_intermediates"][-1 if self.text_layer == "last" else -2]
        return states, self.clip.encode_text(tokens, normalize=False)

    @torch.no_grad()
    def sample(self, prompts: List[str], seed: int, steps: int, guidance_scale: float) -> torch.Tensor:
        states, pooled = self.encode(prompts)
        empty_states, empty_pooled = self.encode([""] * len(prompts))
        context = torch.cat([empty_states, states])  # unconditional half first
        class_labels = torch.cat([empty_pooled, pooled]) if self.unet.config.class_embed_type else None
        self.scheduler.set_timesteps(steps)
        c, size = self.unet.config.in_channels, self.unet.config.sample_size
        x = torch.randn((len(prompts), c, size, size), generator=torch.Generator().manual_seed(seed))
        x = x * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=context, class_labels=class_labels).sample
            uncond, cond = out.chunk(2)
            x = self.scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
        return self.vae.decode(x / self.vae.config.scaling_factor).sample.clamp(-1, 1)
