"""The precomputed-shard format: what ``mmdiff precompute`` writes and training reads.

A precompute folder holds, for input shard number ``i`` of a split, ``{train,val}-iiiiii.tar``
whose samples hold

===================== ===========================================================================
``latent.npy``        C×h×w, the VAE posterior **mean, unscaled** (``model.precompute_latents``:
                      ``distribution`` or ``mean``), or one unscaled posterior draw (``sample``);
                      h×w is the sample's own cropped image size / the VAE factor, so a folder
                      made from aspect buckets holds latents of several shapes
``latent_logvar.npy`` C×h×w, the posterior log-variance (``distribution`` only): training draws a
                      fresh latent ``mean + exp(logvar / 2)·ε`` every step, as online encoding does
``context.npy``       L×D, the text encoder's token states (``model.clip.text_layer``)
``pooled.npy``        E, the pooled text embedding
``original_size.npy`` int64 (2,): (h, w) of the source image before resizing  } SDXL micro-
``crop_top_left.npy`` int64 (2,): (top, left) of its centre crop, resized     } conditioning
``txt`` / ``json``    the caption (and the source's json member, copied)
===================== ===========================================================================

with the encoders' arrays in ``model.precompute_dtype`` (fp16, or fp32), and once per folder
``precompute.json`` (what made the shards), ``empty_prompt.npz`` (the empty prompt's ``context``
and ``pooled``, for caption dropout), ``vae_probe.npy`` (the VAE posterior mean of a fixed probe
image) and ``precomputed.yaml`` (the config keys that train from the folder).

``precompute.json``'s ``latent_shape`` is that of a ``data.image_size`` square image. A training
batch stacks latents of one shape, as the bucketed stream delivers them.

Training (``model.precomputed: true``) checks the folder against its own model before the first
step (:func:`check_against`): latent and text shapes, the probe through its VAE and the empty prompt
through its text encoder, so shards made with another VAE or text encoder are an error, not a
silently wrong run. The job that writes the folder is :mod:`mmdiff.jobs.precompute`.

Format 2 added ``original_size.npy`` and ``crop_top_left.npy``. A format-1 folder (without them)
still trains: its ``precomputed.yaml`` does not list them in ``data.array_keys``, so its batches
lack the two keys and the system falls back to its defaults for them.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mmdiff.config.data import MICRO_CONDITIONING_KEYS
from mmdiff.data.shards import expand_shards, local_path
from mmdiff.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
METADATA = "precompute.json"
EMPTY_PROMPT = "empty_prompt.npz"
VAE_PROBE = "vae_probe.npy"
FRAGMENT = "precomputed.yaml"
SPLITS = ("train", "val")
# Cosine similarity below which a stored reference and this model's own answer disagree.
MATCH_COSINE = 0.99


def probe_image(size: int) -> torch.Tensor:
    """A fixed smooth 1×3×size×size image in [-1, 1], for checking that a VAE is the same one."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([
        torch.sin(3 * math.pi * x) * torch.cos(2 * math.pi * y),
        x * y * 2 - 0.5,
        torch.cos(2.5 * math.pi * (x + y)) * 0.8,
    ])
    return image.clamp(-1, 1).unsqueeze(0)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))


def store_keys(latents: str) -> List[str]:
    """The ``NAME.npy`` members of each sample (``data.array_keys`` of training from the folder)."""
    return (["latent"] + (["latent_logvar"] if latents == "distribution" else []) + ["context", "pooled"]
            + list(MICRO_CONDITIONING_KEYS))


def find_precompute_dir(train_shards: Sequence[str]) -> Optional[Path]:
    """The folder holding ``precompute.json`` beside the (local) training shards, if any."""
    urls = expand_shards(list(train_shards), "data.train_shards")
    path = local_path(urls[0]) if urls else None
    if path is None:
        return None
    folder = Path(os.path.expanduser(path)).parent
    return folder if (folder / METADATA).is_file() else None


def read_metadata(folder: str | Path) -> Dict[str, Any]:
    path = Path(folder) / METADATA
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}); re-run mmdiff precompute.") from None


def load_empty_prompt(folder: str | Path) -> Dict[str, torch.Tensor]:
    """The stored empty-prompt states ``{"context": 1×L×D, "pooled": 1×E}`` (float32)."""
    path = Path(folder) / EMPTY_PROMPT
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in ("context", "pooled")}
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}); re-run mmdiff precompute.") from None


@torch.no_grad()
def check_against(system: Any, folder: str | Path) -> Dict[str, torch.Tensor]:
    """Check a precompute folder against a text-to-image system; return its empty-prompt states.

    Raises :class:`DataError` when the stored latents or text states do not fit the system's
    shapes, or were made by a different VAE or text encoder than the system's.
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    fix = "re-run `mmdiff precompute` with this config into a new folder (or fix the config)."
    want_latent = [system.latent_channels, system.latent_size, system.latent_size]
    if list(meta.get("latent_shape", [])) != want_latent:
        raise DataError(f"latents in {folder} have shape {meta.get('latent_shape')} but this model "
                        f"needs {want_latent}; {fix}")
    clip = system.clip
    want_context = [clip.context_length, clip.text_width]
    if list(meta.get("context_shape", [])) != want_context:
        raise DataError(f"text states in {folder} have shape {meta.get('context_shape')} but this "
                        f"model's text encoder gives {want_context}; {fix}")
    empty = load_empty_prompt(folder)
    mine = system.encode_prompts([""])
    similarity = min(_cosine(empty[k], mine[k].cpu()) for k in ("context", "pooled"))
    if similarity < MATCH_COSINE:
        raise DataError(f"the text states in {folder} were made by a different text encoder than "
                        f"this config's model.clip (empty-prompt similarity {similarity:.3f}); {fix}")
    probe_path = folder / VAE_PROBE
    if probe_path.is_file():
        stored = torch.from_numpy(np.load(probe_path, allow_pickle=False).astype(np.float32))
        ours = system.encode_posterior(probe_image(int(meta["image_size"]))).mean.float().cpu()
        similarity = _cosine(stored, ours) if stored.shape == ours.shape else -1.0
        if similarity < MATCH_COSINE:
            raise DataError(f"the latents in {folder} were made by a different VAE than this config's "
                            f"model.vae (probe similarity {similarity:.3f}); {fix}")
    log.info("training from precomputed latents and text states in %s (%s, %s)", folder,
             meta.get("latents"), meta.get("dtype"))
    return empty
