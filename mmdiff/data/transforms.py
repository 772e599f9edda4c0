"""Image preprocessing: resize to cover the target, crop (centre or random), optional flip, to [-1, 1].

The target is ``size``×``size`` (the square path) or, with aspect-ratio buckets, a per-image
(width, height) passed to :meth:`ImageTransform.apply`.

:meth:`ImageTransform.apply` also says where the pixels came from, as SDXL's micro-conditioning
wants them (the recipe of diffusers' ``train_text_to_image_sdxl.py``): ``original_size`` (h, w)
before resizing, and ``crop_top_left`` (top, left) of the crop in the resized image, with ``left``
mirrored (``resized_width - left - crop_width``) when the crop was flipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmdiff.errors import DataError


def resize_to_cover(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (bicubic, antialiased), keeping the aspect ratio, to the smallest size that covers
    ``width``×``height``."""
    scale = max(width / img.width, height / img.height)
    if scale == 1:
        return img
    new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    return img.resize(new, Image.Resampling.BICUBIC)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic, antialiased) so that the shorter side is ``size`` pixels."""
    return resize_to_cover(img, size, size)


def crop_offsets(width: int, height: int, size: int, rng: Optional[np.random.Generator] = None,
                 crop_height: Optional[int] = None) -> Tuple[int, int]:
    """(top, left) of a ``size``×``size`` crop (``size``×``crop_height`` when given) of a
    width×height image: random when ``rng`` is given (two draws: left, then top), else centred
    (rounded down; torchvision's CenterCrop rounds half to even, which differs by one pixel for
    some odd margins — the recorded offset is always the one these pixels were cropped at)."""
    crop_height = size if crop_height is None else crop_height
    if rng is None:
        return (height - crop_height) // 2, (width - size) // 2
    left = int(rng.integers(0, width - size + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    return top, left


def _crop(img: Image.Image, top: int, left: int, width: int, height: int) -> Image.Image:
    if (left, top, img.width, img.height) == (0, 0, width, height):
        return img
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor 3×H×W in [-1, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class Transformed:
    """A transformed image and its micro-conditioning (see the module docstring)."""

    image: torch.Tensor  # 3×height×width of the target, float32 in [-1, 1]
    original_size: Tuple[int, int]  # (height, width) before resizing
    crop_top_left: Tuple[int, int]  # (top, left) of the crop in the resized (and flipped) image


class ImageTransform:
    """Resize + crop + flip + to tensor. Random choices come from the ``rng`` passed per call."""

    def __init__(self, size: int, random_crop: bool = False, random_flip: bool = False) -> None:
        self.size = size
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        """The image only, 3×size×size in [-1, 1] (:meth:`apply` also gives its sizes)."""
        return self.apply(img, rng).image

    def apply(self, img: Image.Image, rng: Optional[np.random.Generator] = None,
              original_size: Optional[Tuple[int, int]] = None,
              target: Optional[Tuple[int, int]] = None) -> Transformed:
        """The image and its micro-conditioning. ``original_size`` (h, w) overrides ``img``'s own
        size, for an image decoded at reduced scale (a JPEG draft) whose file was larger;
        ``target`` (width, height) replaces the square ``size``×``size`` (an aspect-ratio bucket).

        The random draws are exactly those of the crop and the flip, in that order, so recording
        the sizes changes no data stream.
        """
        original = (int(original_size[0]), int(original_size[1])) if original_size else (img.height, img.width)
        width, height = target if target is not None else (self.size, self.size)
        img = resize_to_cover(img, width, height)
        resized_width = img.width
        top, left = crop_offsets(img.width, img.height, width,
                                 rng if (self.random_crop and rng is not None) else None, height)
        img = _crop(img, top, left, width, height)
        if self.random_flip and rng is not None and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            # The same pixels are the crop at the mirrored offset of the flipped resized image.
            left = resized_width - left - width
        return Transformed(to_tensor(img), original, (top, left))


def read_image_file(path: str | Path, size: int) -> torch.Tensor:
    """An image file as 3×size×size in [-1, 1], centre-cropped as validation shards are.

    Raises :class:`~mmdiff.errors.DataError` naming the file when it is missing or not an image.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image '{path}' does not exist; pass the path of an image file.")
    try:
        with Image.open(p) as img:
            img.load()
            picture = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"'{path}' is not a readable image ({type(err).__name__}); pass a PNG or JPEG file.") from None
    return ImageTransform(size)(picture)
