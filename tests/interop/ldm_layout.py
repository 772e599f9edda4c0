"""diffusers U-Net keys → the original CompVis/Stable Diffusion layout (test helper).

The inverse of diffusers' ``convert_ldm_unet_checkpoint`` for the blocks mmdiff builds, after
diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any number
of levels and layers per block. Used to make SD-layout files from tiny random U-Nets.
"""
from __future__ import annotations

from typing import Dict

import torch

TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_to_ldm(state: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    n, lpb = len(config["block_out_channels"]), int(config["layers_per_block"])
    prefixes = {}
    for i in range(n):
        for j in range(lpb):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.1."
        for j in range(lpb + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.1."
        if i < n - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."
            has_attn = "CrossAttn" in config["up_block_types"][i]
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(lpb + 1) * i + lpb}.{2 if has_attn else 1}."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        prefixes[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in TOP.items():
            if key.startswith(hf + "."):
                new = sd + key[len(hf):]
        for hf, sd in prefixes.items():
            if key.startswith(hf):
                rest = key[len(hf):]
                if ".resnets." in hf:
                    for a, b in RESNET.items():
                        rest = rest.replace(a + ".", b + ".", 1) if rest.startswith(a + ".") else rest
                new = sd + rest
        out["model.diffusion_model." + new] = value
    return out
