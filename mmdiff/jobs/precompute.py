"""The precompute job: run the frozen VAE and text encoder of a config once, write shards.

``mmdiff precompute CONFIG --out DIR [key=value ...]`` (or :func:`precompute`) reads the image
shards of a text-to-image config (``data.train_shards`` and ``data.val_shards``) and writes the
folder :mod:`mmdiff.data.precomputed` describes (and training reads). Images are centre-cropped;
random crops and flips cannot be replayed on stored latents. Each sample keeps its original size
and crop offset (SDXL's micro-conditioning) beside its latents, and its latent has the shape of its
own cropped image (:func:`image_transform`): images of several shapes (aspect buckets) are encoded
in batches of one shape each and stored at their own shape.

**Latent scale.** Latents are stored unscaled. Training multiplies them by the system's
``latent_scale`` (``model.vae.scaling_factor``, or 1/std estimated from the first training
batches of stored latents) exactly as with online encoding, and sampling divides by the same
buffer before decoding, so one checkpoint holds one consistent scale.

**Parallel.** Under ``srun`` or ``torchrun`` each rank (``RANK``/``WORLD_SIZE``, else
``SLURM_PROCID``/``SLURM_NTASKS``) takes input shards ``i ≡ rank (mod world)`` and the GPU
``LOCAL_RANK``/``SLURM_LOCALID``; rank 0 writes the folder files. Output shards are written under
a temporary name and renamed when complete; a re-run skips shards that already exist (so a
preempted job continues), unless ``overwrite``.

This job is one of the two modules outside ``systems/`` that import a system (the bench is the
other): it builds the frozen encoders exactly as training does.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from mmdiff.config import to_container
from mmdiff.config.data import MICRO_CONDITIONING_KEYS
from mmdiff.config.filter_rules import parse_filters
from mmdiff.data.buckets import BucketSet
from mmdiff.data.decode import CorruptSample, DecodeSpec, decode_sample
from mmdiff.data.filters import Dropped
from mmdiff.data.shards import expand_shards
from mmdiff.data.tario import ShardError, iter_samples, list_keys
from mmdiff.data.transforms import ImageTransform, Transformed
from mmdiff.io.atomic import AtomicFile, write_bytes_atomic
from mmdiff.run.devices import resolve_device
from mmdiff.data.precomputed import (EMPTY_PROMPT, FORMAT_VERSION, FRAGMENT, METADATA, SPLITS, VAE_PROBE,
                                     probe_image, read_metadata, store_keys)
from mmdiff.errors import ConfigError, DataError
from mmdiff.systems.text_to_image import TextToImageSystem

log = logging.getLogger(__name__)

_FIXED_MTIME = 946684800.0  # as mmdiff.data.writers: reproducible tar bytes
# The model.vae keys that change what the encoder computes (recorded in precompute.json).
_VAE_KEYS = ("pretrained", "in_channels", "latent_channels", "block_out_channels", "layers_per_block",
             "norm_num_groups", "precision")


# ------------------------------------------------------------------------------------ helpers
def launch_rank() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment; (0, 1, 0) alone."""
    env = os.environ

    def read(*names: str) -> Optional[int]:
        for name in names:
            value = env.get(name)
            if value not in (None, ""):
                try:
                    return int(value)  # type: ignore[arg-type]
                except ValueError:
                    raise DataError(f"environment variable {name}={value!r} is not an integer.") from None
        return None

    if env.get("RANK") not in (None, ""):
        rank, world, local = read("RANK"), read("WORLD_SIZE"), read("LOCAL_RANK")
    else:
        rank, world, local = read("SLURM_PROCID"), read("SLURM_NTASKS"), read("SLURM_LOCALID")
    rank, world = rank or 0, world or 1
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is not below the world size {world}; check the launcher settings.")
    return rank, world, local or 0


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


@dataclass
class PrecomputeResult:
    """What one rank did: the shards it wrote or found, and the samples in them."""

    out_dir: Path
    rank: int
    world: int
    written: Dict[str, List[Path]] = field(default_factory=dict)
    existing: Dict[str, List[Path]] = field(default_factory=dict)
    samples: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        for split in self.samples:
            parts.append(
                f"{split}: {self.samples[split]} samples in {len(self.written.get(split, []))} new + "
                f"{len(self.existing.get(split, []))} existing shard(s), {self.skipped.get(split, 0)} skipped"
            )
        return f"rank {self.rank}/{self.world} → {self.out_dir}: " + "; ".join(parts)


def config_fragment(out_dir: Path, latents: str, splits: Sequence[str]) -> str:
    """The YAML that trains from a precompute folder (``base:`` it last, or pass it as overrides)."""
    lines = [
        "# Written by `mmdiff precompute`: train from these shards by listing this file last in your",
        "# config's base: (keys set in the config itself still win), or with the overrides",
        f"#   {' '.join(fragment_overrides(out_dir, latents, splits))}",
        "data:",
        f"  train_shards: ['{(out_dir / 'train-*.tar').as_posix()}']",
    ]
    if "val" in splits:
        lines.append(f"  val_shards: ['{(out_dir / 'val-*.tar').as_posix()}']")
    lines += [
        "  load_images: false",
        "  caption_key: txt",
        f"  array_keys: [{', '.join(store_keys(latents))}]",
        "model:",
        "  precomputed: true",
        "",
    ]
    return "\n".join(lines)


def fragment_overrides(out_dir: Path, latents: str, splits: Sequence[str]) -> List[str]:
    """The same as :func:`config_fragment`, as ``key=value`` overrides."""
    items = [f"data.train_shards={(out_dir / 'train-*.tar').as_posix()}"]
    if "val" in splits:
        items.append(f"data.val_shards={(out_dir / 'val-*.tar').as_posix()}")
    items += ["data.load_images=false", "data.caption_key=txt",
              f"data.array_keys=[{','.join(store_keys(latents))}]", "model.precomputed=true"]
    return items


# ------------------------------------------------------------------------------- the encoder
class _Encoder:
    """The frozen VAE + text encoder of a text-to-image config, built exactly as training builds them."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        # Same seed and construction order as `mmdiff fit`, so randomly initialised (test/demo)
        # encoders are the very ones training will hold.
        L.seed_everything(cfg.seed, verbose=False)
        system = TextToImageSystem(cfg)
        system.unet = None  # not needed here; frees its memory
        self.system = system.to(device).eval()
        self.device = device
        self.latents = cfg.model.precompute_latents
        self.np_dtype = np.float16 if cfg.model.precompute_dtype == "fp16" else np.float32

    @torch.no_grad()
    def encode(self, images: torch.Tensor, captions: List[str]) -> Dict[str, np.ndarray]:
        s = self.system
        posterior = s.encode_posterior(images.to(self.device))
        if self.latents == "sample":
            arrays = {"latent": posterior.sample()}
        else:
            arrays = {"latent": posterior.mean}
            if self.latents == "distribution":
                arrays["latent_logvar"] = posterior.logvar
        arrays.update(s.encode_prompts(captions))
        return {k: v.float().cpu().numpy().astype(self.np_dtype) for k, v in arrays.items()}

    def metadata(self, cfg: DictConfig, sources: Dict[str, List[str]]) -> Dict[str, Any]:
        s = self.system
        m = cfg.model
        return {
            "format": FORMAT_VERSION,
            "latents": self.latents,
            "dtype": m.precompute_dtype,
            "image_size": int(cfg.data.image_size),
            "latent_shape": [s.latent_channels, s.latent_size, s.latent_size],
            "context_shape": [s.clip.context_length, s.clip.text_width],
            "pooled_dim": s.clip.embed_dim,
            "array_keys": store_keys(self.latents),
            "latent_scale_note": "latents are unscaled; training multiplies by the model's latent_scale",
            "vae": {k: v for k, v in to_container(m.vae).items() if k in _VAE_KEYS},
            "clip": {k: v for k, v in to_container(m.clip).items() if k != "freeze"},
            "seed": int(cfg.seed),
            "caption_key": str(cfg.data.caption_key),
            "sources": sources,
        }


# ------------------------------------------------------------------------------------- main
def _stacked(raws: List[Any], outs: List[Transformed], captions: List[str]):
    """One batch of :func:`_batches`: the images stacked, the sizes as int64 N×2 arrays."""
    sizes = {name: np.array([getattr(o, name) for o in outs], dtype=np.int64) for name in MICRO_CONDITIONING_KEYS}
    return raws, torch.stack([o.image for o in outs]), captions, sizes


def image_transform(cfg: DictConfig) -> Callable[..., Transformed]:
    """What each stored latent is encoded from: the training stream's transform without its random
    choices (centre crop, no flip), to the image's nearest-aspect bucket with ``data.buckets``; the
    image's shape is the latent's, times the VAE factor."""
    transform = ImageTransform(int(cfg.data.image_size))
    buckets = BucketSet.from_config(cfg.data)
    if buckets is None:
        return transform.apply

    def to_bucket(image: Image.Image, original_size: Optional[Tuple[int, int]] = None) -> Transformed:
        height, width = original_size or (image.height, image.width)
        return transform.apply(image, None, original_size, buckets.nearest(height, width))

    return to_bucket


def _draft_size(cfg: DictConfig) -> int:
    """The side a reduced-scale JPEG decode must still cover: the largest bucket's, or image_size."""
    buckets = BucketSet.from_config(cfg.data)
    return buckets.max_side if buckets else int(cfg.data.image_size)


def _batches(url: str, cfg: DictConfig, batch_size: int, counter: Dict[str, int]):
    """(raw samples, images, captions, sizes) batches of one input shard, each of one image shape
    (a shape's samples wait in their own buffer until it holds ``batch_size``; the rest come at the
    end of the shard); corrupt samples are counted. ``sizes`` holds each image's micro-conditioning
    as int64 N×2 arrays."""
    d = cfg.data
    spec = DecodeSpec(caption_key=str(d.caption_key), load_images=True,
                      max_image_pixels=int(d.max_image_pixels), draft_size=_draft_size(cfg),
                      filters=tuple(parse_filters(list(d.filters))), min_size=int(d.min_size))
    transform = image_transform(cfg)
    pending: Dict[Tuple[int, ...], Tuple[List[Any], List[Transformed], List[str]]] = {}
    try:
        for raw in iter_samples(url):
            try:
                decoded = decode_sample(raw, spec)
                out = transform(decoded.image, original_size=decoded.original_size)
            except Dropped:  # the config's data rules leave it out of the precomputed shards too
                counter["dropped"] += 1
                continue
            except Exception as err:  # CorruptSample, or anything a broken file makes PIL raise
                counter["skipped"] += 1
                reason = str(err) if isinstance(err, CorruptSample) else repr(err)
                log.warning("skipping sample %s of %s: %s", raw.key, url, reason)
                continue
            raws, outs, captions = pending.setdefault(tuple(out.image.shape), ([], [], []))
            raws.append(raw)
            outs.append(out)
            captions.append(decoded.caption)
            if len(raws) == batch_size:
                yield _stacked(*pending.pop(tuple(out.image.shape)))
    except ShardError as err:
        counter["skipped"] += 1
        log.warning("%s; the rest of that shard is skipped", err)
    for raws, outs, captions in pending.values():
        yield _stacked(raws, outs, captions)


def _write_shard(url: str, out: Path, cfg: DictConfig, encoder: _Encoder, batch_size: int,
                 counter: Dict[str, int], bar: Any) -> int:
    written = 0
    with AtomicFile(out, remove_leftovers=True) as f:
        writer = TarWriter(f, encoder=False, mtime=_FIXED_MTIME)
        for raws, images, captions, sizes in _batches(url, cfg, batch_size, counter):
            # Sizes stay int64: fp16 would round sizes above 2048 pixels.
            arrays = {**encoder.encode(images, captions), **sizes}
            for i, (raw, caption) in enumerate(zip(raws, captions)):
                sample = {"__key__": raw.key, "txt": caption.encode("utf-8")}
                if "json" in raw.members:
                    sample["json"] = raw.members["json"]
                for name, array in arrays.items():
                    sample[f"{name}.npy"] = _npy(array[i])
                writer.write(sample)
            written += len(raws)
            if bar is not None:
                bar.update(len(raws))
        writer.close()
    return written


def precompute(
    cfg: DictConfig,
    out_dir: str | Path,
    *,
    splits: Sequence[str] = SPLITS,
    batch_size: Optional[int] = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    rank: Optional[int] = None,
    world: Optional[int] = None,
) -> PrecomputeResult:
    """Encode a text-to-image config's image shards once into latent/text-state shards in ``out_dir``.

    ``batch_size`` defaults to ``data.val_batch_size``; ``rank``/``world`` default to the launcher's
    environment (see the module docstring). Returns what this rank did.
    """
    if cfg.system != "text_to_image":
        raise ConfigError(f"mmdiff precompute is for text_to_image configs, not '{cfg.system}'.")
    if cfg.model.precomputed or not cfg.data.load_images:
        raise ConfigError("mmdiff precompute reads image shards: run it with the image config "
                          "(model.precomputed=false, data.load_images=true).")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"unknown split(s) {unknown}; choose from {list(SPLITS)}.")
    if cfg.data.crop != "center" or cfg.data.random_flip or cfg.data.random_shift:
        log.warning("data.crop/random_flip/random_shift augment images; precomputed latents are of "
                    "centre crops, without flips or shifts")
    batch_size = int(batch_size or cfg.data.val_batch_size)
    if batch_size < 1:
        raise ConfigError(f"the precompute batch size must be positive, got {batch_size}.")
    env_rank, env_world, local_rank = launch_rank()
    rank = env_rank if rank is None else int(rank)
    world = env_world if world is None else int(world)
    dev = resolve_device(device, local_rank)
    sources: Dict[str, List[str]] = {}
    for split in splits:
        specs = list(cfg.data.train_shards if split == "train" else cfg.data.val_shards)
        if not specs:
            if split == "train":
                raise DataError("data.train_shards is empty; list the image shards to precompute.")
            continue
        sources[split] = expand_shards(specs, f"data.{split}_shards")
    out = Path(out_dir).expanduser().resolve()  # made once the device and the sources are known good
    out.mkdir(parents=True, exist_ok=True)

    encoder = _Encoder(cfg, dev)
    meta = encoder.metadata(cfg, sources)
    old = out / METADATA
    if old.is_file() and not overwrite:
        previous = read_metadata(out)
        if {k: v for k, v in previous.items() if k != "sources"} != {k: v for k, v in meta.items() if k != "sources"}:
            raise DataError(f"{out} holds precomputed shards made with other settings; pass "
                            "--overwrite to replace them, or choose another --out folder.")
    if rank == 0:
        _write_folder_files(out, encoder, meta, cfg)

    result = PrecomputeResult(out, rank, world)
    mine = {split: [i for i in range(len(urls)) if i % world == rank] for split, urls in sources.items()}
    total: Optional[int] = 0
    todo: Dict[str, List[int]] = {}
    for split, ids in mine.items():
        todo[split] = []
        result.existing[split] = []
        for i in ids:
            target = out / f"{split}-{i:06d}.tar"
            if target.is_file() and not overwrite:
                result.existing[split].append(target)
                continue
            todo[split].append(i)
            try:
                total = None if total is None else total + len(list_keys(sources[split][i]))
            except ShardError:
                total = None
    bar = tqdm(total=total, unit="img", desc=f"precompute rank {rank}",
               disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        for split, ids in todo.items():
            counter = {"skipped": 0, "dropped": 0}
            result.written[split] = []
            result.samples[split] = 0
            for i in ids:
                target = out / f"{split}-{i:06d}.tar"
                n = _write_shard(sources[split][i], target, cfg, encoder, batch_size, counter, bar)
                result.written[split].append(target)
                result.samples[split] += n
                log.debug("wrote %s (%d samples)", target, n)
            for target in result.existing[split]:
                try:
                    result.samples[split] += len(list_keys(str(target)))
                except ShardError:
                    pass
            result.skipped[split] = counter["skipped"]
            if counter["dropped"]:
                log.info("%s: %d samples dropped by data.filters / data.min_size", split, counter["dropped"])
    finally:
        bar.close()
    log.info(result.summary())
    return result


def _write_folder_files(out: Path, encoder: _Encoder, meta: Dict[str, Any], cfg: DictConfig) -> None:
    s = encoder.system
    with torch.no_grad():
        empty = s.encode_prompts([""])
        probe = s.encode_posterior(probe_image(int(cfg.data.image_size)).to(encoder.device)).mean
    buf = io.BytesIO()
    np.savez(buf, context=empty["context"].cpu().numpy().astype(np.float32),
             pooled=empty["pooled"].cpu().numpy().astype(np.float32))
    write_bytes_atomic(out / EMPTY_PROMPT, buf.getvalue())
    write_bytes_atomic(out / VAE_PROBE, _npy(probe.float().cpu().numpy()))
    splits = list(meta["sources"])
    write_bytes_atomic(out / FRAGMENT, config_fragment(out, meta["latents"], splits).encode())
    write_bytes_atomic(out / METADATA, (json.dumps(meta, indent=1) + "\n").encode())


__all__ = ["precompute", "PrecomputeResult", "config_fragment", "fragment_overrides", "launch_rank"]
