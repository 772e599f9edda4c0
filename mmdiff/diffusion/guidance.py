"""Classifier-free guidance and the denoiser that samplers call.

A :class:`Denoiser` wraps a network ``model_fn(x_t, t, cond) -> output`` into
``denoise(x_t, t, ᾱ) -> Denoised(x0, eps, var)``: it runs the conditional and unconditional
branches in one batched call, combines them (scale + rescale), and converts the output to x̂_0 and
ε̂ for the noise level ᾱ. Samplers only ever see this callable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor

from mmdiff.diffusion.objectives import edm_scalings, eps_from_x0, split_prediction

Cond = Optional[Dict[str, Any]]
ModelFn = Callable[[Tensor, Tensor, Cond], Tensor]


@dataclass
class Denoised:
    """A denoiser's answer at one noise level: x̂_0, ε̂ and (learned variance) the raw v ∈ [-1, 1]."""

    x0: Tensor
    eps: Tensor
    var: Optional[Tensor] = None


def concat_cond(first: Cond, second: Cond) -> Cond:
    """Stack two condition dicts along the batch dim (tensors concatenated, lists joined)."""
    if first is None and second is None:
        return None
    if first is None or second is None or set(first) != set(second):
        raise ValueError("cond and uncond must be dicts with the same keys for classifier-free guidance.")
    out: Dict[str, Any] = {}
    for key in first:
        a, b = first[key], second[key]
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            out[key] = torch.cat([a, b.to(a.device)], 0)
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            out[key] = list(a) + list(b)
        elif a is None and b is None:
            out[key] = None
        else:
            raise ValueError(f"cond['{key}'] and uncond['{key}'] must both be tensors or both be lists.")
    return out


def rescale_guidance(guided: Tensor, cond_out: Tensor, rescale: float) -> Tensor:
    """Lin et al. 2023 §3.4: match the per-sample std of the guided output to the conditional one,
    then blend ``rescale · rescaled + (1 - rescale) · guided``."""
    if rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


def guide(uncond_out: Tensor, cond_out: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """``u + scale·(c - u)``, optionally rescaled."""
    return rescale_guidance(uncond_out + scale * (cond_out - uncond_out), cond_out, rescale)


class Denoiser:
    """Network → (x̂_0, ε̂[, v]) at a noise level, with classifier-free guidance.

    Guidance runs when ``uncond`` is given and ``guidance_scale != 1``: the unconditional and
    conditional inputs go through ``model_fn`` as one batch (unconditional first, as diffusers),
    outputs are combined on the network's own output (ε, x_0 or v — all linear in each other).
    With learned variance only the mean channels are guided; the variance channels come from
    the conditional branch. ``nfe`` counts network calls.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        prediction_type: str = "epsilon",
        *,
        learned_variance: bool = False,
        sigma_data: Optional[float] = None,
        cond: Cond = None,
        uncond: Cond = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        clip_denoised: Optional[float] = None,
    ) -> None:
        self.model_fn = model_fn
        self.prediction_type = prediction_type
        self.learned_variance = learned_variance
        self.sigma_data = sigma_data
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.clip_denoised = clip_denoised
        self.guided = uncond is not None and self.guidance_scale != 1.0
        self.nfe = 0

    @staticmethod
    def _time(t: Union[Tensor, float, int], n: int, x: Tensor) -> Tensor:
        """Timesteps as a (n,) tensor: integers stay LongTensor, fractional ones take x's dtype."""
        t = torch.as_tensor(t)
        if t.ndim == 0:
            t = t.expand(n)
        if t.dtype.is_floating_point:  # at least float32: fractional timesteps near 999 need it
            return t.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        return t.to(device=x.device, dtype=torch.long)

    def _call(self, x_in: Tensor, t: Union[Tensor, float, int]) -> Tensor:
        n = x_in.shape[0]
        self.nfe += 1
        if not self.guided:
            return self.model_fn(x_in, self._time(t, n, x_in), self.cond)
        if self.guidance_scale == 0:
            return self.model_fn(x_in, self._time(t, n, x_in), self.uncond)
        both = self.model_fn(
            torch.cat([x_in, x_in]), self._time(t, 2 * n, x_in), concat_cond(self.uncond, self.cond)
        )
        out_u, out_c = both.chunk(2)
        c = x_in.shape[1]
        if not self.learned_variance:
            return guide(out_u, out_c, self.guidance_scale, self.guidance_rescale)
        mean = guide(out_u[:, :c], out_c[:, :c], self.guidance_scale, self.guidance_rescale)
        return torch.cat([mean, out_c[:, c:]], 1)

    def __call__(self, x: Tensor, t: Union[Tensor, float, int], alpha_bar: float) -> Denoised:
        """Denoise VP sample ``x`` (= √ᾱ x_0 + √(1-ᾱ) ε) whose model timestep is ``t``."""
        alpha_bar = float(alpha_bar)
        x_in = x * edm_scalings(alpha_bar, self.sigma_data)[0] if self.sigma_data is not None else x
        out = self._call(x_in, t)
        channels = x.shape[1]
        var = None
        expected = 2 * channels if self.learned_variance else channels
        if out.shape[1] != expected:
            raise ValueError(
                f"the model returned {out.shape[1]} channels but {expected} are expected for "
                f"{channels}-channel samples{' with learned variance' if self.learned_variance else ''}."
            )
        if self.learned_variance:
            out, var = out[:, :channels], out[:, channels:]
        x0, eps = split_prediction(out, x, self.prediction_type, alpha_bar, self.sigma_data)
        if self.clip_denoised is not None:
            x0 = x0.clamp(-self.clip_denoised, self.clip_denoised)
            if alpha_bar < 1:
                eps = eps_from_x0(x, x0, alpha_bar)
        return Denoised(x0, eps, var)


def cfg_model(model_fn: ModelFn, cond: Cond, uncond: Cond, scale: float, rescale: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    """A plain ``(x, t) -> output`` guided model (for callers that want raw outputs)."""
    den = Denoiser(model_fn, cond=cond, uncond=uncond, guidance_scale=scale, guidance_rescale=rescale)
    return lambda x, t: den._call(x, t)


__all__ = ["Denoised", "Denoiser", "concat_cond", "guide", "rescale_guidance", "cfg_model"]
