"""Masked (absorbing-state) diffusion for token sequences — MDLM (Sahoo et al. 2024).

Forward process: each token is independently replaced by ``mask_id`` with probability
``m(t) = (1-ε)·t`` at time ``t ∈ [0, 1]`` (the log-linear schedule: ``α_t = 1 - (1-ε)t``,
``σ(t) = -log α_t``). The network ``logits_fn(x_t, t) -> (B, L, V)`` predicts the clean tokens; the
SUBS parameterisation forbids predicting ``mask_id`` and carries unmasked tokens over unchanged.

The continuous-time ELBO is a weighted masked cross-entropy:
``L = E_t [ -α'_t/(1-α_t) · Σ_{masked i} log p_θ(x_i | x_t) ]`` and for the log-linear schedule the
weight ``-α'_t/(1-α_t)`` is exactly ``1/t``. Losses are in nats per (non-padding) token.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor, Tensor], Tensor]


class MaskedDiffusion:
    """MDLM-style masked diffusion: forward masking, ELBO loss, and a cached ancestral sampler."""

    def __init__(self, mask_id: int, vocab_size: int, eps: float = 1e-3) -> None:
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id {mask_id} must be a token id below vocab_size {vocab_size}.")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}.")
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)
        self.eps = float(eps)

    # ------------------------------------------------------------------ schedule
    def move_chance(self, t: Tensor) -> Tensor:
        """Probability that a token is masked at time t: ``(1-ε)·t``."""
        return (1 - self.eps) * t

    def alpha(self, t: Tensor) -> Tensor:
        """α_t = 1 - (1-ε)t, the probability that a token is still clean."""
        return 1 - self.move_chance(t)

    def elbo_weight(self, t: Tensor) -> Tensor:
        """-α'_t / (1-α_t) = 1/t for the log-linear schedule."""
        return 1.0 / t

    def sample_t(self, batch: int, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None) -> Tensor:
        """Low-discrepancy times in [ε, 1]: ``t_i = ε + (1-ε)·((u₀ + i/B) mod 1)`` (MDLM's antithetic sampling)."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u0 = torch.rand((), generator=generator, device=gen_device).cpu()
        u = (u0 + torch.arange(batch) / batch) % 1.0
        t = self.eps + (1 - self.eps) * u
        return t.to(device) if device is not None else t

    # ------------------------------------------------------------------ forward process
    def q_sample(
        self, tokens: Tensor, t: Tensor, generator: Optional[torch.Generator] = None, keep: Optional[Tensor] = None
    ) -> Tensor:
        """Mask each token independently with probability ``(1-ε)·t`` (t per sample, (B,)).

        Positions where ``keep`` is True are never masked.
        """
        gen_device = generator.device if generator is not None else tokens.device
        u = torch.rand(tokens.shape, generator=generator, device=gen_device).to(tokens.device)
        masked = u < self.move_chance(t.to(tokens.device)).reshape(-1, *([1] * (tokens.ndim - 1)))
        if keep is not None:
            masked = masked & ~keep.to(tokens.device).bool()
        return torch.where(masked, torch.full_like(tokens, self.mask_id), tokens)

    def log_probs(self, logits: Tensor) -> Tensor:
        """SUBS: the mask token gets zero probability; log-softmax over the rest (float32)."""
        logits = logits.float().clone()
        logits[..., self.mask_id] = float("-inf")
        return F.log_softmax(logits, dim=-1)

    # ------------------------------------------------------------------ training
    def loss(
        self,
        logits_fn: LogitsFn,
        tokens: Tensor,
        pad_mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        *,
        t: Optional[Tensor] = None,
        known: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """The MDLM continuous-time ELBO, in nats per counted token.

        ``tokens`` (B, L) clean ids; ``pad_mask`` (B, L) True at padding positions, which are never
        masked and not counted (to let a model learn sequence length, keep pad/EOS tokens as
        ordinary tokens and pass no pad_mask); ``known`` (B, L) True at conditioning positions
        (e.g. a prompt prefix), never masked but counted. Returns ``loss``, ``masked_fraction``.
        """
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError("tokens must be an integer tensor of shape (batch, length).")
        if bool((tokens == self.mask_id).any()):
            raise ValueError(f"the clean tokens contain the mask id {self.mask_id}; it is reserved for masking.")
        batch = tokens.shape[0]
        if t is None:
            t = self.sample_t(batch, generator)
        t = t.to(tokens.device, torch.float32)
        pad = pad_mask.bool() if pad_mask is not None else torch.zeros_like(tokens, dtype=torch.bool)
        keep = pad if known is None else pad | known.bool()
        x_t = self.q_sample(tokens, t, generator, keep=keep)
        log_p = self.log_probs(logits_fn(x_t, t))
        if log_p.shape != (*tokens.shape, self.vocab_size):
            raise ValueError(
                f"logits_fn returned shape {tuple(log_p.shape)}, expected {(*tokens.shape, self.vocab_size)}."
            )
        nll = -log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        masked = x_t == self.mask_id
        weighted = torch.where(masked, nll, torch.zeros_like(nll)) * self.elbo_weight(t).unsqueeze(-1)
        count = (~pad).sum().clamp(min=1)
        return {
            "loss": weighted.sum() / count,
            "masked_fraction": (masked.sum() / count).detach(),
        }

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        logits_fn: LogitsFn,
        batch_size: int,
        length: int,
        *,
        steps: int = 32,
        tokens: Optional[Tensor] = None,
        known: Optional[Tensor] = None,
        strength: float = 1.0,
        generator: Optional[torch.Generator] = None,
        temperature: float = 1.0,
        cache: bool = True,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        """Ancestral sampling from t = strength down to 0 in ``steps`` equal steps (MDLM, ddpm_cache).

        A masked token is revealed between t and s < t with probability (t-s)/t, drawn from
        p_θ(x_0 | x_t) (logits / ``temperature``; 0 = argmax); the last step reveals every
        remaining mask. Revealed tokens never change.

        * ``tokens`` (B, L): a starting sequence; its ``mask_id`` positions are generated.
        * ``known`` (B, L) or (L,) bool: positions of ``tokens`` kept as they are (a prefix of a
          partly written caption); default: every non-mask position of ``tokens``.
        * ``strength`` < 1: the non-known tokens are re-masked with probability (1-ε)·strength
          and sampling starts at t = strength (start from a corrupted sequence).
        * ``cache``: skip the network call when no token changed since the previous one (valid for
          models that ignore t, as MDLM without time conditioning).
        """
        if not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps}.")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        if temperature < 0:
            raise ValueError("temperature must be >= 0.")
        if device is None:
            device = tokens.device if tokens is not None else torch.device("cpu")
        shape = (batch_size, length)
        if tokens is None:
            if known is not None:
                raise ValueError("known positions need the tokens that fill them (pass tokens=...).")
            x = torch.full(shape, self.mask_id, dtype=torch.long, device=device)
            keep = torch.zeros(shape, dtype=torch.bool, device=device)
        else:
            if tuple(tokens.shape) != shape:
                raise ValueError(f"tokens has shape {tuple(tokens.shape)} but {shape} was requested.")
            x = tokens.to(device=device, dtype=torch.long).clone()
            if known is None:
                keep = x != self.mask_id
            else:
                keep = known.to(device).bool().expand(shape)
                if bool((x[keep] == self.mask_id).any()):
                    raise ValueError("a known position holds the mask token; give its value in tokens.")
            if strength < 1.0:
                t0 = torch.full((batch_size,), float(strength), device=device)
                x = self.q_sample(x, t0, generator, keep=keep)
        gen_device = generator.device if generator is not None else device
        probs: Optional[Tensor] = None
        for k in range(steps):
            t = strength * (1 - k / steps)
            s = strength * (1 - (k + 1) / steps)
            masked = x == self.mask_id
            if not bool(masked.any()):
                break
            if probs is None or not cache:
                t_vec = torch.full((batch_size,), t, device=device)
                log_p = self.log_probs(logits_fn(x, t_vec))
                probs = log_p if temperature == 0 else F.softmax(log_p / temperature, dim=-1)
            reveal_p = 1.0 if k == steps - 1 else (t - s) / t
            u = torch.rand(shape, generator=generator, device=gen_device).to(device)
            reveal = masked & (u < reveal_p)
            if bool(reveal.any()):
                chosen = probs[reveal]
                if temperature == 0:
                    new = chosen.argmax(-1)
                else:
                    new = torch.multinomial(chosen.to(gen_device), 1, generator=generator).squeeze(-1).to(device)
                x[reveal] = new
                probs = None
        return x
