"""Caption heads over open_clip image features: an autoregressive decoder and a masked-diffusion denoiser.

Both heads are the same small pre-norm transformer (:class:`CaptionTransformer`): caption token
embeddings + learned positions, with the projected pooled CLIP image embedding as a *prefix
token* in front of the caption, and cross-attention from every block to the projected per-patch
CLIP image tokens. ``causal=True`` makes it the autoregressive decoder (teacher forcing, then
greedy / beam / top-k / top-p decoding by :func:`decode`); ``causal=False`` makes it the
bidirectional denoiser that :class:`mmdiff.diffusion.MaskedDiffusion` trains and samples (the
system wires the two — this module holds the networks only).

The vocabulary is :mod:`mmdiff.models.caption_vocab`; decoding is :mod:`mmdiff.models.caption_decoding`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiff.errors import ConfigError


# ------------------------------------------------------------------------------- the network
class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, kv_width: Optional[int] = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width or width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor, context: Tensor, causal: bool = False) -> Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-norm: self-attention, cross-attention to the image tokens, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads, dropout)
        self.ln_cross = nn.LayerNorm(width)
        self.cross_attn = _Attention(width, heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, causal: bool) -> Tensor:
        h = self.ln_self(x)
        x = x + self.drop(self.self_attn(h, h, causal=causal))
        x = x + self.drop(self.cross_attn(self.ln_cross(x), memory))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


@dataclass
class ImageContext:
    """Projected image features for one batch: the prefix token B×1×D and the memory B×N×D."""

    prefix: Tensor
    memory: Tensor

    def repeat(self, n: int) -> "ImageContext":
        """Each row repeated ``n`` times in place (row i → rows i·n … i·n+n-1), for beams/samples."""
        return ImageContext(self.prefix.repeat_interleave(n, 0), self.memory.repeat_interleave(n, 0))

    def index(self, rows: Tensor) -> "ImageContext":
        return ImageContext(self.prefix[rows], self.memory[rows])


class CaptionTransformer(nn.Module):
    """Caption transformer conditioned on CLIP (pooled, tokens); causal (AR) or bidirectional (masked).

    ``forward(ctx, ids)`` returns logits B×L×vocab_size for the head ids ``ids`` (B×L): with
    ``causal=True`` position i predicts ids[i+1]; with ``causal=False`` position i predicts the
    clean token at i.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        pooled_dim: int,
        token_width: int,
        *,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        causal: bool = True,
    ) -> None:
        super().__init__()
        if width % heads != 0:
            raise ConfigError(f"model.caption.width {width} must be divisible by model.caption.heads {heads}.")
        self.causal = bool(causal)
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.randn(max_length + 1, width) * 0.02)
        self.prefix_proj = nn.Sequential(nn.LayerNorm(pooled_dim), nn.Linear(pooled_dim, width))
        self.memory_proj = nn.Sequential(nn.LayerNorm(token_width), nn.Linear(token_width, width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # output layer tied to token_embedding
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def context(self, pooled: Tensor, tokens: Tensor) -> ImageContext:
        """CLIP ``(pooled B×E, tokens B×N×W)`` → :class:`ImageContext`."""
        return ImageContext(self.prefix_proj(pooled).unsqueeze(1), self.memory_proj(tokens))

    def hidden(self, ctx: ImageContext, ids: Tensor) -> Tensor:
        """Final hidden states B×L×D at the caption positions (the prefix position dropped)."""
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"captions of {length} tokens exceed max_length {self.max_length}.")
        x = torch.cat([ctx.prefix, self.token_embedding(ids)], dim=1) + self.positions[: length + 1]
        for block in self.blocks:
            x = block(x, ctx.memory, self.causal)
        return self.ln_final(x[:, 1:])

    def project(self, hidden: Tensor) -> Tensor:
        """Hidden states … × D → logits … × vocab_size (weights tied to the token embedding)."""
        return F.linear(hidden, self.token_embedding.weight, self.bias)

    def forward(self, ctx: ImageContext, ids: Tensor) -> Tensor:
        return self.project(self.hidden(ctx, ids))


# ------------------------------------------------------------------ autoregressive training
def teacher_forcing_loss(
    head: CaptionTransformer, ctx: ImageContext, ids: Tensor, pad: int, label_smoothing: float = 0.0
) -> Tensor:
    """Mean next-token cross-entropy (nats per token) over every target up to and including eot.

    Only the non-padding positions are projected to the vocabulary, which matters for the full
    49k-token vocabulary.
    """
    hidden = head.hidden(ctx, ids[:, :-1])
    target = ids[:, 1:]
    keep = target != pad
    return F.cross_entropy(
        head.project(hidden[keep]), target[keep], label_smoothing=label_smoothing
    )


__all__ = ["CaptionTransformer", "ImageContext", "teacher_forcing_loss"]
