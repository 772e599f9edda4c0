"""What the two IterableDatasets behind :class:`~mmdiff.data.datamodule.ShardDataModule` share:
the batch format, decoding, placeholders and collation.

Both yield ready-made batches (use them with ``DataLoader(batch_size=None)``)::

    {"image":   float32 B×3×H×W in [-1, 1]   (absent when data.load_images is false),
     "original_size": int64 B×2  (h, w) of each image before resizing,
     "crop_top_left": int64 B×2  (top, left) of its crop in the resized image (mirrored when
                                 flipped): SDXL's micro-conditioning (mmdiff.data.transforms), with
                                 "image" only; placeholders hold (size, size) and (0, 0),
     "caption": list of B str,
     "key":     list of B str                 (the webdataset __key__),
     NAME:      B×...  for each NAME in data.array_keys (from NAME.npy members; the
                        micro-conditioning keys of precomputed shards as int64),
     "valid":   bool B        (False only for validation placeholders: padding, a corrupt or dropped sample),
     "skipped": int64 B       (samples this worker skipped so far: since its training stream
                               started, or in this validation pass; all equal),
     "worker":  int64 B       (DataLoader worker id that made the batch; all equal),
     "dropped": int64 B×K     (only with data.filters or data.min_size: samples this worker dropped
                               so far per rule, counted like "skipped"; columns in the order of
                               mmdiff.config.filter_rules.drop_names)}

* :class:`~mmdiff.data.train_stream.TrainStream` — endless, resampled, seeded; exactly ``steps_per_epoch`` batches per rank
  per pass (epoch), continuing one stream per worker; corrupt samples are skipped and counted.
* :class:`~mmdiff.data.val_stream.ValStream` — finite, deterministic, rank-balanced; corrupt and dropped samples
  become flagged placeholders (``valid`` False) so that every rank makes the same number of batches.

With aspect-ratio buckets (``buckets``, :mod:`mmdiff.data.buckets`) each image is resized and
cropped to its nearest-aspect bucket and both streams batch shape by shape, so every batch has one
shape ("image" B×3×H×W with (W, H) a bucket; placeholders take the bucket nearest a square).

See :mod:`mmdiff.data.splitting` for who reads what.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from mmdiff.config.data import MICRO_CONDITIONING_KEYS
from mmdiff.config.filter_rules import drop_names
from mmdiff.data.buckets import BucketSet, shape_key
from mmdiff.data.decode import CorruptSample, DecodeSpec, decode_sample, find_image_member
from mmdiff.data.filters import DropCounter
from mmdiff.data.tario import RawSample
from mmdiff.data.transforms import ImageTransform
from mmdiff.errors import DataError

Item = Dict[str, Any]

#: The only image formats whose headers are parsed (as in mmdiff.data.decode: no other PIL plugin
#: sees bytes from a shard).
_HEADER_FORMATS = ("JPEG", "PNG", "WEBP")

#: Key of the stream position each training batch carries out of its DataLoader worker;
#: :class:`~mmdiff.data.datamodule.TrainLoader` removes it before Lightning sees the batch.
POSITION_KEY = "_position"


class BatchStream(IterableDataset):
    """What both streams share: shard URLs, decoding, item construction and collation."""

    def __init__(
        self,
        urls: Sequence[str],
        spec: DecodeSpec,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        buckets: Optional[BucketSet] = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise DataError("no shards to read.")
        self.urls = list(urls)
        self.spec = spec
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.seed = seed
        self.num_workers = num_workers  # only for __len__; iteration uses the real worker info
        self.buckets = buckets
        self._array_refs: Dict[str, torch.Tensor] = {}  # placeholder shapes, per worker
        self.drop_names = drop_names(spec.filters, spec.min_size)

    # ----------------------------------------------------------------------------- items
    def _item(self, raw: RawSample, transform: ImageTransform, rng: Optional[np.random.Generator],
              shapes: Dict[str, Tuple[int, ...]], caption_seed: Optional[Sequence[int]] = None) -> Item:
        decoded = decode_sample(raw, self.spec, caption_seed)
        arrays = {}
        for name, array in decoded.arrays.items():
            expected = shapes.setdefault(name, tuple(array.shape))
            if tuple(array.shape) != expected and self.buckets is None:  # buckets batch by shape
                raise CorruptSample(f"{name}.npy has shape {tuple(array.shape)}, expected {expected}")
            arrays[name] = torch.from_numpy(np.ascontiguousarray(array))
        item: Item = {"image": None, "caption": decoded.caption, "key": decoded.key, "arrays": arrays,
                      "valid": True}
        if decoded.image is not None:
            target = None
            if self.buckets is not None:
                height, width = decoded.original_size or (decoded.image.height, decoded.image.width)
                target = self.buckets.nearest(height, width)
            out = transform.apply(decoded.image, rng, decoded.original_size, target)
            item.update(image=out.image, original_size=out.original_size, crop_top_left=out.crop_top_left)
        return item

    def _bucket_key(self, raw: RawSample, transform: ImageTransform, rng: Optional[np.random.Generator],
                    shapes: Dict[str, Tuple[int, ...]]) -> Any:
        """The shape ``raw`` will have once decoded: its bucket, read from the image header alone
        (no pixels decoded), or, for arrays-only batches, the arrays' shapes. Raises what decoding
        raises for a sample whose header cannot be read."""
        ext = find_image_member(raw.members) if self.spec.load_images and raw.error is None else None
        if ext is not None and self.buckets is not None:
            try:
                with warnings.catch_warnings():  # decode_sample checks the pixel count itself
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(io.BytesIO(raw.members[ext]), formats=_HEADER_FORMATS) as img:
                        width, height = img.size
                if width > 0 and height > 0:
                    width, height = self.buckets.nearest(height, width)
                    return ("image", (3, height, width))
            except Exception:  # unreadable header: the full decode below says why
                pass
        return shape_key(self._item(raw, transform, rng, shapes))

    def _placeholder(self, key: str = "") -> Item:
        item: Item = {"image": None, "caption": "", "key": key, "arrays": {}, "valid": False}
        if self.spec.load_images:  # an uncropped image of the target size: SDXL's neutral values
            width, height = self.buckets.squarest if self.buckets else (self.image_size, self.image_size)
            item.update(image=torch.zeros(3, height, width), original_size=(height, width), crop_top_left=(0, 0))
        return item

    def _collate(self, items: List[Item], skipped: int, worker: int, drops: Optional[DropCounter] = None) -> Dict[str, Any]:
        n = len(items)
        batch: Dict[str, Any] = {}
        if self.spec.load_images:
            batch["image"] = torch.stack([it["image"] for it in items])
            for name in MICRO_CONDITIONING_KEYS:
                batch[name] = torch.tensor([it[name] for it in items], dtype=torch.long).reshape(n, 2)
        batch["caption"] = [it["caption"] for it in items]
        batch["key"] = [it["key"] for it in items]
        for name in self.spec.array_keys:
            ref = next((it["arrays"][name] for it in items if it["valid"]), self._array_refs.get(name))
            if ref is None:  # a batch of placeholders only, and no valid sample seen before
                raise DataError(f"cannot shape placeholders for '{name}': no valid sample seen yet.")
            self._array_refs[name] = ref
            batch[name] = torch.stack([it["arrays"][name] if it["valid"] else torch.zeros_like(ref)
                                       for it in items])
            if name in MICRO_CONDITIONING_KEYS:  # sizes are integers, whatever dtype a shard stored
                batch[name] = batch[name].long()
        batch["valid"] = torch.tensor([bool(it["valid"]) for it in items], dtype=torch.bool)
        batch["skipped"] = torch.full((n,), skipped, dtype=torch.long)
        batch["worker"] = torch.full((n,), worker, dtype=torch.long)
        if drops is not None and drops.names:
            batch["dropped"] = torch.tensor([drops.as_list()] * n, dtype=torch.long).reshape(n, len(drops.names))
        return batch

    def new_pass(self) -> None:
        """Called by the DataLoader before each pass (in the main process)."""

