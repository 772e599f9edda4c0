"""Write text-to-image samples to disk: one PNG per sample in prompt order, plus a grid; read the
init image and mask of img2img and inpainting."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from mmdiff.data.transforms import to_tensor
from mmdiff.errors import UsageError
from mmdiff.eval.generative import generate
from mmdiff.io.atomic import write_text_atomic
from mmdiff.io.images import grid, save_png, to_pil


def write_samples(
    system: Any,
    prompts: List[str],
    *,
    n_per_prompt: int,
    out_dir: str | Path,
    batch_size: int = 64,
    seed: int = 0,
    **options: Any,
) -> Path:
    """Sample and write ``OUT/0000.png …`` and ``OUT/grid.png`` (a row per prompt); returns OUT."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # fails here, not after the sampling, if OUT cannot be a folder
    options = {k: v for k, v in options.items() if v is not None}
    images = generate(system, prompts, n_per_prompt, batch_size, seed, **options)
    for index, picture in enumerate(to_pil(images)):
        save_png(picture, out / f"{index:04d}.png")
    save_png(grid(images, nrow=n_per_prompt), out / "grid.png")
    write_text_atomic(out / "prompts.txt", "".join(f"{i:04d}\t{p}\n" for i, p in enumerate(p for p in prompts for _ in range(n_per_prompt))))
    return out


def _open_image(path: str | Path, what: str, mode: str) -> Image.Image:
    if not Path(path).is_file():
        raise UsageError(f"{what} '{path}' does not exist; pass the path of an image file.")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"{what} '{path}' is not a readable image ({type(err).__name__}); pass a PNG or JPEG file.") from None


def read_init_images(image: str | Path, mask: Optional[str | Path] = None) -> Tuple[Image.Image, Optional[Image.Image]]:
    """The init image (RGB) and optional inpainting mask (greyscale) files of img2img / inpainting.

    Raises :class:`UsageError` (one line) for a missing or unreadable file or a mask whose size is
    not the image's, so a command fails before it loads a checkpoint.
    """
    picture = _open_image(image, "init image", "RGB")
    if mask is None:
        return picture, None
    stencil = _open_image(mask, "mask", "L")
    if stencil.size != picture.size:
        raise UsageError(f"mask '{mask}' is {stencil.size[0]}x{stencil.size[1]} pixels but init image '{image}' is "
                         f"{picture.size[0]}x{picture.size[1]}; pass a mask of the image's size.")
    return picture, stencil


def cover_crop(picture: Image.Image, height: int, width: int) -> Image.Image:
    """``picture`` resized (bicubic) to cover height×width and centre-cropped to it; for a square
    this is the validation shards' transform (shorter side to the size, centre crop)."""
    scale = max(width / picture.width, height / picture.height)
    cover = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    picture = picture.resize(cover, Image.Resampling.BICUBIC)  # PIL returns a copy at its own size
    top, left = (picture.height - height) // 2, (picture.width - width) // 2
    return picture.crop((left, top, left + width, top + height))


def init_tensors(picture: Image.Image, stencil: Optional[Image.Image], height: int,
                 width: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """PIL init image and mask → ``init_image`` 1×3×height×width in [-1, 1] and ``mask``
    1×1×height×width (1 where the mask is white: regenerate; 0 where black: keep), resized and
    centre-cropped alike."""
    image = to_tensor(cover_crop(picture, height, width)).unsqueeze(0)
    if stencil is None:
        return image, None
    # [-1, 1]: > 0 is lighter than mid-grey
    return image, (to_tensor(cover_crop(stencil, height, width))[:1].unsqueeze(0) > 0).float()
