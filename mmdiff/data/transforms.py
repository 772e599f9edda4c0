"""Image preprocessing: resize to cover the target, crop (centre or random), optional flip, optional
random shift, to [-1, 1].

The target is ``size``×``size`` (the square path) or, with aspect-ratio buckets, a per-image
(width, height) passed to :meth:`ImageTransform.apply`.

:meth:`ImageTransform.apply` also says where the pixels came from, as SDXL's micro-conditioning
wants them (the recipe of diffusers' ``train_text_to_image_sdxl.py``): ``original_size`` (h, w)
before resizing, and ``crop_top_left`` (top, left) of the crop in the resized image, with ``left``
mirrored (``resized_width - left - crop_width``) when the crop was flipped.

A random shift of up to ``N`` pixels (``data.random_shift``) moves the crop's content by ``dy, dx``
in [-N, N]: the image is padded by ``N`` pixels of edge replication and cropped back to its size at a
random offset. It is the translation augmentation for images that fill their square (a square image
resized to cover a square crops nothing, and a flip changes what a digit is); ``crop_top_left`` then
says where the shifted window lies in the resized image (it may be negative or past the edge).
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


def shift_image(img: Image.Image, rng: np.random.Generator, max_shift: int) -> Tuple[Image.Image, int, int]:
    """``img`` padded by ``max_shift`` pixels of edge replication and cropped back to its size at a
    random offset (two draws: left, then top, each in [0, 2·max_shift]); also (dy, dx), how far the
    window moved from the image's own, each in [-max_shift, max_shift]."""
    left = int(rng.integers(0, 2 * max_shift + 1))
    top = int(rng.integers(0, 2 * max_shift + 1))
    dy, dx = top - max_shift, left - max_shift
    if dy == 0 and dx == 0:
        return img, 0, 0
    array = np.asarray(img.convert("RGB"))  # RGB, as to_tensor makes it anyway: a palette has no edge
    padded = np.pad(array, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    window = padded[top : top + img.height, left : left + img.width]
    return Image.fromarray(np.ascontiguousarray(window)), dy, dx


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
    """Resize + crop + flip + shift + to tensor. Random choices come from the ``rng`` passed per call."""

    def __init__(self, size: int, random_crop: bool = False, random_flip: bool = False,
                 random_shift: int = 0) -> None:
        if random_shift < 0:
            raise ValueError(f"random_shift must be >= 0 pixels, got {random_shift}.")
        self.size = size
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.random_shift = random_shift

    @property
    def is_random(self) -> bool:
        """True when :meth:`apply` draws from its ``rng`` (a random crop, flip or shift)."""
        return self.random_crop or self.random_flip or self.random_shift > 0

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        """The image only, 3×size×size in [-1, 1] (:meth:`apply` also gives its sizes)."""
        return self.apply(img, rng).image

    def apply(self, img: Image.Image, rng: Optional[np.random.Generator] = None,
              original_size: Optional[Tuple[int, int]] = None,
              target: Optional[Tuple[int, int]] = None) -> Transformed:
        """The image and its micro-conditioning. ``original_size`` (h, w) overrides ``img``'s own
        size, for an image decoded at reduced scale (a JPEG draft) whose file was larger;
        ``target`` (width, height) replaces the square ``size``×``size`` (an aspect-ratio bucket).

        The random draws are exactly those of the crop, the flip and the shift, in that order (the
        shift draws nothing when ``random_shift`` is 0), so recording the sizes changes no data stream.
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
        if self.random_shift > 0 and rng is not None:
            img, dy, dx = shift_image(img, rng, self.random_shift)
            top, left = top + dy, left + dx
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
