"""unCLIP pieces that are plain networks: the prior's denoiser and the decoder's image tokens.

Both sides of unCLIP (Ramesh et al. 2022) exchange CLIP image embeddings in one convention,
:func:`scaled_embedding`: L2-normalised, then multiplied by √E so that each of the E components
has roughly unit variance (the scale the prior's diffusion runs at, as in DALLE2-pytorch).

- :class:`PriorTransformer` — the prior's denoiser: a transformer over the sequence
  [text token states…, text embedding, timestep embedding, noised image embedding, query] whose
  query output is the predicted clean image embedding x0 (§2.2 of the paper; bidirectional here,
  the paper's is causal, which makes no difference to a single read-out token).
- :class:`ImageEmbedTokens` — the decoder's projection of an image embedding into extra
  cross-attention context tokens (§2.1: "four extra tokens of context").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn


def scaled_embedding(embedding: Tensor) -> Tensor:
    """B×E CLIP embeddings → unit length × √E (the unCLIP convention, see the module docstring)."""
    return nn.functional.normalize(embedding.float(), dim=-1) * math.sqrt(embedding.shape[-1])


class PriorTransformer(nn.Module):
    """Denoiser ``(x_t, t, text_embed, text_states, text_mask) → x̂0`` over B×E image embeddings."""

    def __init__(
        self,
        embed_dim: int,
        text_width: int,
        *,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        text_tokens: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, width)
        self.in_x = nn.Linear(embed_dim, width)
        self.in_text = nn.Linear(embed_dim, width)
        self.in_tokens = nn.Linear(text_width, width) if text_tokens else None
        # Learned positions of the four special tokens: text embedding, time, x_t, query.
        self.positions = nn.Parameter(torch.randn(4, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, int(width * mlp_ratio), dropout, activation="gelu", batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_embed: Tensor,
        text_states: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``text_mask`` B×L is True at real tokens (padding is not attended to)."""
        b = x_t.shape[0]
        t = t.expand(b) if t.ndim == 0 else t
        time = self.time_embed(self.time_proj(t).to(x_t.dtype))
        special = torch.stack(
            [self.in_text(text_embed.to(x_t.dtype)), time, self.in_x(x_t), self.positions.new_zeros(b, self.positions.shape[1])],
            dim=1,
        ) + self.positions
        seq, pad = special, None
        if self.in_tokens is not None:
            if text_states is None:
                raise ValueError("this prior attends to text token states; pass text_states.")
            seq = torch.cat([self.in_tokens(text_states.to(x_t.dtype)), special], dim=1)
            if text_mask is not None:
                keep = torch.cat([text_mask.bool(), text_mask.new_ones(b, 4, dtype=torch.bool)], dim=1)
                pad = ~keep
        hidden = self.blocks(seq, src_key_padding_mask=pad)
        return self.out(hidden[:, -1])


class ImageEmbedTokens(nn.Module):
    """B×E image embedding → B×N×W extra context tokens for the decoder's cross-attention."""

    def __init__(self, embed_dim: int, n_tokens: int, width: int) -> None:
        super().__init__()
        self.n_tokens, self.width = int(n_tokens), int(width)
        self.proj = nn.Linear(embed_dim, n_tokens * width)
        self.norm = nn.LayerNorm(width)

    def forward(self, embedding: Tensor) -> Tensor:
        tokens = self.proj(embedding).view(embedding.shape[0], self.n_tokens, self.width)
        return self.norm(tokens)


__all__ = ["PriorTransformer", "ImageEmbedTokens", "scaled_embedding"]
