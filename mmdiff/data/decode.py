"""Safe decoding of raw shard samples: images, text, JSON and ``.npy`` arrays — nothing else.

A shard downloaded from the internet must not be able to run code, so this module never
unpickles (``.pyd``, ``.pickle``), never ``torch.load``s (``.pth``, ``.pt``) and never hands a member
to webdataset's automatic decoders. Members with any other extension are ignored. Images are
parsed only by PIL's JPEG, PNG and WebP plugins and are refused (as a possible decompression bomb)
when their header announces more than ``max_image_pixels`` pixels, before any pixel is decoded;
``.npy`` arrays are read with ``allow_pickle=False``. Samples whose key is an absolute path or
climbs with ``..`` are refused (:mod:`mmdiff.data.keys`).

Anything wrong with a sample raises :class:`CorruptSample`; callers skip and count it. A good sample
that a rule of the :class:`DecodeSpec` excludes (``data.filters``, ``data.min_size``) raises
:class:`~mmdiff.data.filters.Dropped`, counted apart.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from mmdiff.config.filter_rules import MetadataFilter
from mmdiff.data.filters import check_metadata, check_size, choose_caption, field_value
from mmdiff.data.keys import unsafe_key_reason
from mmdiff.data.tario import RawSample

IMAGE_EXTS: Tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_PIL_FORMATS = ("JPEG", "PNG", "WEBP")
# 40 Mpx (e.g. 8000×5000): far above any training resolution, and a decoded RGB image of at most
# 120 MB per worker. PIL's own limit (89 Mpx, only a warning below twice that) lets a 50 Mpx PNG
# of a few kilobytes expand to 150 MB in every DataLoader worker. mmdiff.config's default matches.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class CorruptSample(Exception):
    """A sample that cannot be used (bad image, no caption, ...); the message says why."""


@dataclass(frozen=True)
class DecodeSpec:
    """What to take from each sample."""

    # "txt" reads the caption member; "json:FIELD" (FIELD may be dotted: "json:meta.caption").
    caption_key: str = "txt"
    load_images: bool = True
    # Names of ``NAME.npy`` members to load as arrays (e.g. precomputed latents).
    array_keys: Tuple[str, ...] = ()
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # JPEG only: let libjpeg decode at a reduced scale that still covers this many pixels a side.
    draft_size: Optional[int] = None
    # Rules that drop a sample (raising mmdiff.data.filters.Dropped): json and caption-length
    # filters, checked before the image is decoded, and the smallest shorter side kept.
    filters: Tuple[MetadataFilter, ...] = ()
    min_size: int = 0


@dataclass
class Decoded:
    """A usable sample: PIL image (RGB) or None, caption, key and any requested arrays."""

    key: str
    caption: str
    image: Optional[Image.Image] = None
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    # (height, width) of the image as stored: ``image`` is smaller when decoded at reduced scale.
    original_size: Optional[Tuple[int, int]] = None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 draft_size: Optional[int] = None) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes into an RGB image; alpha is composited on white."""
    return decode_image_sized(data, max_pixels, draft_size)[0]


def decode_image_sized(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       draft_size: Optional[int] = None) -> Tuple[Image.Image, Tuple[int, int]]:
    """:func:`decode_image`, and the (height, width) its header announces (before any draft)."""
    with warnings.catch_warnings():
        # We check the size ourselves below; PIL's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
        except Image.DecompressionBombError as err:
            raise CorruptSample(f"image refused as a possible decompression bomb ({err})") from None
        except Exception as err:
            raise CorruptSample(f"not a readable JPEG/PNG/WebP image ({type(err).__name__})") from None
        width, height = img.size
        if width * height > max_pixels:
            raise CorruptSample(
                f"image is {width}x{height} pixels, over data.max_image_pixels={max_pixels}; "
                "skipped as a possible decompression bomb"
            )
        if width == 0 or height == 0:
            raise CorruptSample("image has zero size")
        try:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            if img.mode.startswith("I"):  # 16-bit greyscale PNG: PIL's convert("RGB") clips it to white
                img = _grey16_to_l(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                out = Image.new("RGB", rgba.size, (255, 255, 255))
                out.paste(rgba, mask=rgba.getchannel("A"))
                return out, (height, width)
            return img.convert("RGB"), (height, width)
        except Exception as err:  # truncated data, bad Huffman tables, ...
            raise CorruptSample(f"image data is corrupt ({type(err).__name__}: {str(err)[:80]})") from None


def _grey16_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (mode ``I;16*`` or ``I``, values 0..65535) scaled to 8-bit ``L``."""
    values = np.asarray(img).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def decode_text(data: bytes, what: str = "txt") -> str:
    """UTF-8 text (BOM and surrounding whitespace removed)."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise CorruptSample(f"the {what} member is not UTF-8 text") from None


def decode_json(data: bytes) -> Any:
    """A JSON document."""
    try:
        return json.loads(decode_text(data, "json"))
    except json.JSONDecodeError as err:
        raise CorruptSample(f"the json member is not valid JSON ({err.msg})") from None


def decode_array(data: bytes, name: str = "npy") -> np.ndarray:
    """A ``.npy`` array, read with ``allow_pickle=False`` (object arrays are refused)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:
        raise CorruptSample(f"the {name} member is not a plain .npy array ({type(err).__name__})") from None


def read_captions(members: Mapping[str, bytes], caption_key: str, meta: Any = None) -> List[str]:
    """The sample's caption(s): the txt member, or a json field holding a string or a non-empty
    list of strings (``meta``: the json member already parsed, if it was)."""
    if caption_key == "txt":
        if "txt" not in members:
            raise CorruptSample("no caption (missing .txt member)")
        return [decode_text(members["txt"])]
    if not caption_key.startswith("json:"):
        raise ValueError(f"caption_key must be 'txt' or 'json:FIELD', got {caption_key!r}")
    path = caption_key[len("json:"):]
    if "json" not in members:
        raise CorruptSample(f"no caption (missing .json member for field '{path}')")
    value: Any = field_value(decode_json(members["json"]) if meta is None else meta, path)
    if value is None:
        raise CorruptSample(f"no caption (json has no field '{path}')")
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    if not isinstance(value, str):
        raise CorruptSample(f"json field '{path}' is not a string or a non-empty list of strings")
    return [value.strip()]


def find_image_member(members: Mapping[str, bytes]) -> Optional[str]:
    """The extension of the sample's image member (jpg, jpeg, png or webp), if any."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext
    return None


def decode_sample(raw: RawSample, spec: DecodeSpec, caption_seed: Optional[Sequence[int]] = None) -> Decoded:
    """Decode what ``spec`` asks for from a raw sample; raise :class:`CorruptSample` if unusable
    and :class:`~mmdiff.data.filters.Dropped` if a rule of ``spec`` excludes it. Of several
    captions one is drawn with ``caption_seed`` (the first without one)."""
    if raw.error is not None:
        raise CorruptSample(raw.error)
    unsafe = unsafe_key_reason(raw.key)
    if unsafe is not None:  # would escape an output folder if written as a path (precompute)
        raise CorruptSample(unsafe)
    members = raw.members
    meta = None
    if spec.filters:
        meta = decode_json(members["json"]) if "json" in members else None
        check_metadata(spec.filters, meta)
    caption = choose_caption(read_captions(members, spec.caption_key, meta), spec.filters, caption_seed)
    image, original_size = None, None
    if spec.load_images:
        ext = find_image_member(members)
        if ext is None:
            raise CorruptSample("no image member (jpg, jpeg, png or webp)")
        image, original_size = decode_image_sized(members[ext], spec.max_image_pixels, spec.draft_size)
        check_size(spec.min_size, original_size)
    arrays = {}
    for name in spec.array_keys:
        ext = f"{name}.npy"
        if ext not in members:
            raise CorruptSample(f"no {ext} member")
        arrays[name] = decode_array(members[ext], ext)
    return Decoded(key=raw.key, caption=caption, image=image, arrays=arrays, original_size=original_size)
