"""unCLIP from Python: two-stage text → image, image variations and interpolations.

::

    import mmdiff
    from mmdiff.inference import unclip
    from mmdiff.data.transforms import read_image_file
    prior = mmdiff.load("runs/demo/unclip_prior/checkpoints/last.ckpt", expect="prior")
    decoder = unclip.load_decoder("runs/demo/unclip_decoder/checkpoints/last.ckpt")
    images = unclip.two_stage_sample(prior, decoder, ["a handwritten digit seven"] * 4, seed=0)
    variations = unclip.vary(decoder, read_image_file("seven.png", 32), n=8)

The prior turns a caption into a CLIP image embedding; the decoder (a text_to_image system with
``model.image_embed_conditioning``) turns an image embedding (and optionally the caption) into an
image. Variations decode one image's own CLIP embedding with different noise; interpolations
decode embeddings spherically interpolated between two images, with the same noise throughout.
All embeddings are in the :func:`~mmdiff.models.prior_net.scaled_embedding` convention.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from mmdiff.errors import CheckpointError
from mmdiff.inference.api import load

log = logging.getLogger(__name__)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation between embeddings ``a`` and ``b`` (…×E) at fraction(s) ``t``.

    The norm is interpolated linearly; nearly parallel vectors fall back to linear interpolation.
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    t = t.view(*t.shape, *([1] * a.ndim)) if t.ndim else t
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    small = so.abs() < 1e-6
    wa = torch.where(small, 1 - t, torch.sin((1 - t) * omega) / torch.where(small, 1.0, so))
    wb = torch.where(small, t, torch.sin(t * omega) / torch.where(small, 1.0, so))
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True)
    return direction * ((1 - t) * na + t * nb)


def load_decoder(ckpt: str | Path, **load_options: Any) -> Any:
    """A text_to_image checkpoint trained with image-embedding conditioning (else ``CheckpointError``)."""
    decoder = load(ckpt, expect="text_to_image", **load_options)
    if decoder.image_embed_mode == "none":
        raise CheckpointError(
            f"'{ckpt}' was not trained with image-embedding conditioning "
            "(model.image_embed_conditioning is none); train an unCLIP decoder, e.g. configs/demo/unclip_decoder.yaml."
        )
    return decoder


def check_pair(prior: Any, decoder: Any) -> None:
    """Refuse a prior and decoder that do not share one CLIP image tower (same embedding size and
    vision weights: the prior predicts that tower's embeddings). Their text towers may differ — each
    system may train its own (``model.clip.freeze: false``)."""
    if prior.embed_dim != decoder.clip.embed_dim:
        raise CheckpointError(
            f"the prior predicts {prior.embed_dim}-d CLIP image embeddings but the decoder takes "
            f"{decoder.clip.embed_dim}-d ones; train both with the same CLIP."
        )
    a, b = prior.clip.image_state_dict(), decoder.clip.image_state_dict()
    same = a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a
    )
    if not same:
        raise CheckpointError(
            "the prior and the decoder were trained with different CLIP weights, so the prior's "
            "embeddings mean nothing to the decoder; train both with the same model.clip.pretrained."
        )


def two_stage_sample(
    prior: Any,
    decoder: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    prior_options: Optional[dict] = None,
    use_text: bool = True,
    **decoder_options: Any,
) -> torch.Tensor:
    """Prompts → prior → CLIP image embeddings → decoder → images B×3×H×W in [-1, 1].

    ``use_text``: the decoder also sees the caption (the paper's decoder does); else the empty prompt.
    """
    prompts = list(prompts)
    embeds = prior.sample(prompts, seed=seed, **{k: v for k, v in (prior_options or {}).items() if v is not None})
    texts = prompts if use_text else [""] * len(prompts)
    return decoder.sample(texts, seed=seed, image_embeds=embeds.to(decoder.device), **decoder_options)


def image_embeddings(decoder: Any, images: torch.Tensor) -> torch.Tensor:
    """Images B×3×H×W in [-1, 1] → the decoder's CLIP image embeddings B×E."""
    return decoder.embed_images(images)


def vary(decoder: Any, image: torch.Tensor, n: int, *, seed: int = 0, prompt: str = "", **options: Any) -> torch.Tensor:
    """``n`` variations of one image (3×H×W in [-1, 1]): its CLIP embedding decoded with new noise."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}.")
    embed = image_embeddings(decoder, image.unsqueeze(0)).expand(n, -1)
    return decoder.sample([prompt] * n, seed=seed, image_embeds=embed, **options)


def interpolate(
    decoder: Any, image_a: torch.Tensor, image_b: torch.Tensor, n: int, *, seed: int = 0,
    prompt: str = "", **options: Any,
) -> torch.Tensor:
    """``n`` images along the slerp from image A's CLIP embedding to image B's (ends included),
    each decoded from the same noise."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (the two ends), got {n}.")
    ends = image_embeddings(decoder, torch.stack([image_a, image_b]))
    path = slerp(ends[0], ends[1], torch.linspace(0, 1, n, device=ends.device))
    frames: List[torch.Tensor] = [
        decoder.sample([prompt], seed=seed, image_embeds=path[i : i + 1], **options) for i in range(n)
    ]
    return torch.cat(frames)


class TwoStage:
    """A prior and a decoder as one text → image sampler (``.sample(prompts, seed=...)``), e.g. for
    :func:`mmdiff.eval.digit_judge.evaluate_digits`; ``prior_options`` go to the prior's sampler."""

    def __init__(self, prior: Any, decoder: Any, prior_options: Optional[dict] = None, use_text: bool = True) -> None:
        check_pair(prior, decoder)
        self.prior, self.decoder = prior, decoder
        self.prior_options, self.use_text = dict(prior_options or {}), use_text

    def sample(self, prompts: Sequence[str], *, seed: int = 0, **options: Any) -> torch.Tensor:
        return two_stage_sample(self.prior, self.decoder, prompts, seed=seed, prior_options=self.prior_options,
                                use_text=self.use_text, **options)


__all__ = ["slerp", "load_decoder", "check_pair", "two_stage_sample", "vary", "interpolate",
           "image_embeddings", "TwoStage"]
