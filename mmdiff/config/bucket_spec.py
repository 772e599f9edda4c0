"""The ``data.buckets:`` section: aspect-ratio buckets, and the bucket set it describes (torch-free).

A bucket is a (width, height) target whose sides are multiples of ``step`` (the U-Net's latent grid
times the VAE's factor: 64 for Stable Diffusion). The set is either listed (``sizes``) or made from
a pixel budget: for every width ``w`` (a multiple of ``step``, ``w*w <= area``) the tallest height
``h`` (a multiple of ``step``) with ``w*h <= area``, kept with its transpose while
``max(w/h, h/w) <= max_aspect`` — the recipe of kohya-ss/sd-scripts and NovelAI's bucketing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from mmdiff.config.fields import require
from mmdiff.config.image_sizes import Size, parse_sizes

#: The aspect-ratio limit of a generated bucket set when ``max_aspect`` is null.
DEFAULT_MAX_ASPECT = 2.0

#: Systems whose training images all go through the CLIP image tower, which takes one fixed square
#: size: a bucket's non-square batch would reach it squashed (``ClipEncoder.preprocess_images``).
CLIP_IMAGE_SYSTEMS = ("captioning", "contrastive", "prior")


@dataclass
class BucketConfig:
    """Aspect-ratio buckets: each training image is resized to cover its nearest-aspect bucket."""

    # False: every image is resized and cropped to data.image_size² (the square path).
    enabled: bool = False
    # Pixel budget of a generated set; null = data.image_size².
    area: Optional[int] = None
    # Every bucket side is a multiple of this (VAE factor × the U-Net's down-sampling).
    step: int = 64
    # Largest long/short side ratio of a generated set; null = 2.0.
    max_aspect: Optional[float] = None
    # An explicit set instead: "WIDTHxHEIGHT" strings or [WIDTH, HEIGHT] pairs (config/image_sizes.py),
    # e.g. ["832x1216", [1024, 1024]] (then area and max_aspect stay null).
    sizes: List[Any] = field(default_factory=list)

    @staticmethod
    def check(b: DictConfig, cfg: DictConfig) -> None:
        check_buckets(b, int(cfg.data.image_size))
        if not b.enabled:
            return
        require(cfg.system not in CLIP_IMAGE_SYSTEMS,
                f"data.buckets cannot be used with system '{cfg.system}': it feeds every training image to "
                "the CLIP image tower, which takes one square size, so non-square buckets would be squashed; "
                "set data.buckets.enabled=false (images are then cropped to data.image_size squares).")
        embeds = OmegaConf.select(cfg, "model.image_embed_conditioning", default="none")
        require(cfg.system != "text_to_image" or embeds in (None, "none"),
                f"data.buckets cannot be used with model.image_embed_conditioning={embeds}: the unCLIP "
                "decoder is conditioned on the CLIP image embedding of each training image, which the "
                "square CLIP image tower would take squashed; set data.buckets.enabled=false or "
                "model.image_embed_conditioning=none.")


def check_buckets(b: DictConfig, image_size: int) -> None:
    """:meth:`BucketConfig.check` given ``data.image_size`` (for a ``data:`` section on its own)."""
    listed = len(b.sizes) > 0
    shaping = ", ".join(k for k in ("area", "max_aspect") if b[k] is not None)
    if not b.enabled:
        given = ", ".join(filter(None, ["sizes" if listed else "", shaping]))
        require(not given, f"data.buckets ({given}) is set but data.buckets.enabled is false; set "
                "data.buckets.enabled=true or remove it.")
        return
    require(b.step > 0, f"data.buckets.step must be positive, got {b.step}.")
    require(not (listed and shaping),
            f"data.buckets.sizes lists the buckets, so data.buckets ({shaping}) would do nothing; "
            "remove one of them.")
    if listed:
        for width, height in parse_sizes(b.sizes, "data.buckets.sizes"):
            require(width % b.step == 0 and height % b.step == 0,
                    f"data.buckets.sizes entry {width}x{height} must have both sides multiples of "
                    f"data.buckets.step={b.step}, e.g. '{8 * b.step}x{12 * b.step}'.")
        return
    area = b.area if b.area is not None else image_size ** 2
    require(area > 0, f"data.buckets.area must be positive, got {area}.")
    require(b.max_aspect is None or b.max_aspect >= 1.0,
            f"data.buckets.max_aspect must be >= 1, got {b.max_aspect}.")
    require(bool(bucket_sizes(b, image_size)),
            f"data.buckets gives no bucket: no {b.step}-multiple sides fit an area of {area} px "
            f"within an aspect ratio of {b.max_aspect or DEFAULT_MAX_ASPECT}; raise data.buckets.area "
            "or lower data.buckets.step.")


def generated_sizes(area: int, step: int, max_aspect: float) -> List[Size]:
    """The bucket set of a pixel budget (module docstring), sorted by aspect ratio (w/h)."""
    sizes = set()
    for width in range(step, math.isqrt(area) + 1, step):
        height = (area // width) // step * step
        if height >= width and height <= max_aspect * width:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def bucket_sizes(b: DictConfig, image_size: int) -> List[Size]:
    """The (width, height) buckets of a ``data.buckets`` section (empty when it is disabled)."""
    if not b.enabled:
        return []
    if len(b.sizes) > 0:
        listed = set(parse_sizes(b.sizes, "data.buckets.sizes"))
        return sorted(listed, key=lambda s: (s[0] / s[1], s[0]))
    area = int(b.area) if b.area is not None else int(image_size) ** 2
    return generated_sizes(area, int(b.step), float(b.max_aspect or DEFAULT_MAX_ASPECT))
