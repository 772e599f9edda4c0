"""Image preprocessing: resize the shorter side, crop (centre or random), optional flip, to [-1, 1]."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmdiff.errors import DataError


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic, antialiased) so that the shorter side is ``size`` pixels."""
    width, height = img.size
    if min(width, height) == size:
        return img
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    return img.resize(new, Image.Resampling.BICUBIC)


def crop_square(img: Image.Image, size: int, rng: Optional[np.random.Generator] = None) -> Image.Image:
    """A ``size``×``size`` crop: random when ``rng`` is given, else centred."""
    width, height = img.size
    if rng is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left = int(rng.integers(0, width - size + 1))
        top = int(rng.integers(0, height - size + 1))
    if (left, top, width, height) == (0, 0, size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor 3×H×W in [-1, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageTransform:
    """Resize + crop + flip + to tensor. Random choices come from the ``rng`` passed per call."""

    def __init__(self, size: int, random_crop: bool = False, random_flip: bool = False) -> None:
        self.size = size
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        img = resize_shorter_side(img, self.size)
        img = crop_square(img, self.size, rng if (self.random_crop and rng is not None) else None)
        if self.random_flip and rng is not None and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)


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
