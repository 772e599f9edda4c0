"""The ``data:`` section: webdataset shards and the image/caption pipeline."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List

from omegaconf import DictConfig

from mmdiff.config.bucket_spec import BucketConfig
from mmdiff.config.fields import choice, require
from mmdiff.config.filter_rules import parse_filters


#: The batch keys of SDXL's micro-conditioning: ``original_size`` (h, w) of each image before resizing
#: and ``crop_top_left`` (top, left) of its crop in the resized image, each int64 B×2. Image batches
#: fill them in themselves; precomputed shards store them as ``NAME.npy`` members (data.array_keys).
MICRO_CONDITIONING_KEYS = ("original_size", "crop_top_left")


class Crop(str, enum.Enum):
    center = "center"
    random = "random"


@dataclass
class DataConfig:
    """Webdataset shards and the image/caption pipeline."""

    train_shards: List[str] = field(default_factory=list)
    val_shards: List[str] = field(default_factory=list)
    image_size: int = 32
    crop: str = choice(Crop.center)
    random_flip: bool = False
    # Training only: move each image by up to this many pixels each way (padded by edge replication,
    # cropped back to its size; mmdiff.data.transforms.shift_image), drawn from the sample's own
    # augmentation rng; 0 = off. Translation augmentation for images that fill their square (digits).
    random_shift: int = 0
    # "txt" reads the caption member; "json:FIELD" reads FIELD of the json member (a string, or a
    # list of strings: one drawn per sample, seeded).
    caption_key: str = "txt"
    # Images whose shorter side (as stored) is below this many pixels are dropped and counted
    # (data/dropped/min_size); 0 keeps every size; data.image_size here means no image is ever upscaled.
    min_size: int = 0
    # Metadata filters on the json member, e.g. "aesthetic >= 5", "caption_len >= 3" (words):
    # samples failing one (or lacking its field) are dropped and counted (data/dropped/FIELD).
    filters: List[str] = field(default_factory=list)
    batch_size: int = 32
    val_batch_size: int = 64
    num_workers: int = 2
    # Training reads resampled shards: an epoch is this many batches per rank.
    steps_per_epoch: int = 1000
    # Raw (undecoded) samples each training worker shuffles through; 0 or 1 = no shuffling.
    shuffle_buffer: int = 1000
    # Images whose header announces more pixels are skipped as possible decompression bombs
    # (40 Mpx; mmdiff.data.decode.DEFAULT_MAX_IMAGE_PIXELS).
    max_image_pixels: int = 40_000_000
    # False: do not decode images (batches carry captions and `array_keys` only).
    load_images: bool = True
    # Names of NAME.npy members to load into the batch as tensors (e.g. precomputed latents).
    array_keys: List[str] = field(default_factory=list)
    # Aspect-ratio buckets (mmdiff.config.bucket_spec); disabled: the square image_size² path.
    buckets: BucketConfig = field(default_factory=BucketConfig)

    @staticmethod
    def check(d: DictConfig, cfg: DictConfig) -> None:
        require(d.image_size > 0, f"data.image_size must be positive, got {d.image_size}.")
        require(
            0 <= d.random_shift < d.image_size,
            f"data.random_shift must be between 0 and data.image_size - 1 pixels, got {d.random_shift}.",
        )
        require(d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}.")
        require(d.val_batch_size > 0, f"data.val_batch_size must be positive, got {d.val_batch_size}.")
        require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}.")
        require(d.steps_per_epoch > 0, f"data.steps_per_epoch must be positive, got {d.steps_per_epoch}.")
        require(
            d.caption_key == "txt" or d.caption_key.startswith("json:"),
            f"data.caption_key must be 'txt' or 'json:FIELD', got '{d.caption_key}'.",
        )
        require(d.min_size >= 0, f"data.min_size must be >= 0, got {d.min_size}.")
        require(d.min_size == 0 or d.load_images,
                "data.min_size needs images; set it to 0 with data.load_images=false.")
        parse_filters(list(d.filters))
        require(d.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}.")
        require(d.max_image_pixels > 0, f"data.max_image_pixels must be positive, got {d.max_image_pixels}.")
        for name in d.array_keys:
            require(
                bool(name) and "/" not in name and not name.endswith(".npy"),
                f"data.array_keys entries name NAME.npy members without the '.npy', got '{name}'.",
            )
        taken = [k for k in MICRO_CONDITIONING_KEYS if k in d.array_keys]
        require(
            not (d.load_images and taken),
            f"data.array_keys lists {taken}, which image batches compute themselves; list them only "
            "with data.load_images=false (precomputed shards).",
        )
        require(
            d.load_images or len(d.array_keys) > 0,
            "data.load_images is false and data.array_keys is empty: batches would hold no tensors.",
        )
