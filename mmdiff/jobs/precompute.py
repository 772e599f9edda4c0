"""Precomputed latents and text states: run the frozen VAE and text encoder once, write shards.

``mmdiff precompute CONFIG --out DIR [key=value ...]`` (or :func:`precompute`) reads the image
shards of a text-to-image config (``data.train_shards`` and ``data.val_shards``) and writes, for
input shard number ``i`` of a split, ``DIR/{train,val}-iiiiii.tar`` whose samples hold

===================== ===========================================================================
``latent.npy``        C×h×w, the VAE posterior **mean, unscaled** (``model.precompute_latents``:
                      ``distribution`` or ``mean``), or one unscaled posterior draw (``sample``)
``latent_logvar.npy`` C×h×w, the posterior log-variance (``distribution`` only): training draws a
                      fresh latent ``mean + exp(logvar / 2)·ε`` every step, as online encoding does
``context.npy``       L×D, the text encoder's token states (``model.clip.text_layer``)
``pooled.npy``        E, the pooled text embedding
``txt`` / ``json``    the caption (and the source's json member, copied)
===================== ===========================================================================

with arrays in ``model.precompute_dtype`` (fp16, or fp32). Images are centre-cropped; random
crops and flips cannot be replayed on stored latents.

Once per folder: ``precompute.json`` (what made the shards), ``empty_prompt.npz`` (the empty
prompt's ``context`` and ``pooled``, for caption dropout), ``vae_probe.npy`` (the VAE posterior
mean of a fixed probe image) and ``precomputed.yaml`` (the config keys that train from the
folder). Training (``model.precomputed: true``) checks the folder against its own model before
the first step — latent and text shapes, the probe through its VAE and the empty prompt through
its text encoder — so shards made with another VAE or text encoder are an error, not a silently
wrong run.

**Latent scale.** Latents are stored unscaled. Training multiplies them by the system's
``latent_scale`` (``model.vae.scaling_factor``, or 1/std estimated from the first training
batches of stored latents) exactly as with online encoding, and sampling divides by the same
buffer before decoding, so one checkpoint holds one consistent scale.

**Parallel.** Under ``srun`` or ``torchrun`` each rank (``RANK``/``WORLD_SIZE``, else
``SLURM_PROCID``/``SLURM_NTASKS``) takes input shards ``i ≡ rank (mod world)`` and the GPU
``LOCAL_RANK``/``SLURM_LOCALID``; rank 0 writes the folder files. Output shards are written under
a temporary name and renamed when complete; a re-run skips shards that already exist (so a
preempted job continues), unless ``overwrite``.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from mmdiff.config import to_container
from mmdiff.run.devices import resolve_device
from mmdiff.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA = "precompute.json"
EMPTY_PROMPT = "empty_prompt.npz"
VAE_PROBE = "vae_probe.npy"
FRAGMENT = "precomputed.yaml"
SPLITS = ("train", "val")
# Cosine similarity below which a stored reference and this model's own answer disagree.
MATCH_COSINE = 0.99
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


def probe_image(size: int) -> torch.Tensor:
    """A fixed smooth 1×3×size×size image in [-1, 1], for checking that a VAE is the same one."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([
        torch.sin(3 * math.pi * x) * torch.cos(2 * math.pi * y),
        x * y * 2 - 0.5,
        torch.cos(2.5 * math.pi * (x + y)) * 0.8,
    ])
    return image.clamp(-1, 1).unsqueeze(0)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))


def _store_keys(latents: str) -> List[str]:
    return ["latent"] + (["latent_logvar"] if latents == "distribution" else []) + ["context", "pooled"]


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


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


# -------------------------------------------------------------------------------- the folder
def find_precompute_dir(train_shards: Sequence[str]) -> Optional[Path]:
    """The folder holding ``precompute.json`` beside the (local) training shards, if any."""
    from mmdiff.data.shards import expand_shards, local_path

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
        f"  array_keys: [{', '.join(_store_keys(latents))}]",
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
              f"data.array_keys=[{','.join(_store_keys(latents))}]", "model.precomputed=true"]
    return items


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- the encoder
class _Encoder:
    """The frozen VAE + text encoder of a text-to-image config, built exactly as training builds them."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        import lightning as L

        from mmdiff.systems.text_to_image import TextToImageSystem

        # Same seed and construction order as `mmdiff fit`, so randomly initialised (test/demo)
        # encoders are the very ones training will hold.
        L.seed_everything(cfg.seed, verbose=False)
        system = TextToImageSystem(cfg)
        system.unet = None  # not needed here; frees its memory
        self.system = system.to(device).eval()
        self.device = device
        self.latents = str(_value(cfg.model.precompute_latents))
        self.np_dtype = np.float16 if str(_value(cfg.model.precompute_dtype)) == "fp16" else np.float32

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
            "dtype": str(_value(m.precompute_dtype)),
            "image_size": int(cfg.data.image_size),
            "latent_shape": [s.latent_channels, s.latent_size, s.latent_size],
            "context_shape": [s.clip.context_length, s.clip.text_width],
            "pooled_dim": s.clip.embed_dim,
            "array_keys": _store_keys(self.latents),
            "latent_scale_note": "latents are unscaled; training multiplies by the model's latent_scale",
            "vae": {k: v for k, v in to_container(m.vae).items() if k in _VAE_KEYS},
            "clip": {k: v for k, v in to_container(m.clip).items() if k != "freeze"},
            "seed": int(cfg.seed),
            "caption_key": str(cfg.data.caption_key),
            "sources": sources,
        }


# ------------------------------------------------------------------------------------- main
def _batches(url: str, cfg: DictConfig, batch_size: int, counter: Dict[str, int]):
    """(raw samples, images, captions) batches of one input shard; corrupt samples are counted."""
    from mmdiff.data.decode import CorruptSample, DecodeSpec, decode_sample
    from mmdiff.data.tario import ShardError, iter_samples
    from mmdiff.data.transforms import ImageTransform

    d = cfg.data
    spec = DecodeSpec(caption_key=str(d.caption_key), load_images=True,
                      max_image_pixels=int(d.max_image_pixels), draft_size=int(d.image_size))
    transform = ImageTransform(int(d.image_size))  # centre crop, no flip
    raws, images, captions = [], [], []
    try:
        for raw in iter_samples(url):
            try:
                decoded = decode_sample(raw, spec)
                image = transform(decoded.image)
            except Exception as err:  # CorruptSample, or anything a broken file makes PIL raise
                counter["skipped"] += 1
                reason = str(err) if isinstance(err, CorruptSample) else repr(err)
                log.warning("skipping sample %s of %s: %s", raw.key, url, reason)
                continue
            raws.append(raw)
            images.append(image)
            captions.append(decoded.caption)
            if len(raws) == batch_size:
                yield raws, torch.stack(images), captions
                raws, images, captions = [], [], []
    except ShardError as err:
        counter["skipped"] += 1
        log.warning("%s; the rest of that shard is skipped", err)
    if raws:
        yield raws, torch.stack(images), captions


def _write_shard(url: str, out: Path, cfg: DictConfig, encoder: _Encoder, batch_size: int,
                 counter: Dict[str, int], bar: Any) -> int:
    from webdataset import TarWriter

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    written = 0
    try:
        with open(tmp, "wb") as f:
            writer = TarWriter(f, encoder=False, mtime=_FIXED_MTIME)
            for raws, images, captions in _batches(url, cfg, batch_size, counter):
                arrays = encoder.encode(images, captions)
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
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
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
    from tqdm import tqdm

    from mmdiff.data.shards import expand_shards
    from mmdiff.data.tario import ShardError, list_keys

    if cfg.system != "text_to_image":
        raise ConfigError(f"mmdiff precompute is for text_to_image configs, not '{cfg.system}'.")
    if cfg.model.precomputed or not cfg.data.load_images:
        raise ConfigError("mmdiff precompute reads image shards: run it with the image config "
                          "(model.precomputed=false, data.load_images=true).")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"unknown split(s) {unknown}; choose from {list(SPLITS)}.")
    if cfg.data.crop != "center" or cfg.data.random_flip:
        log.warning("data.crop/random_flip augment images; precomputed latents are of centre crops, "
                    "without flips")
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
            counter = {"skipped": 0}
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
    _atomic_write(out / EMPTY_PROMPT, buf.getvalue())
    _atomic_write(out / VAE_PROBE, _npy(probe.float().cpu().numpy()))
    splits = list(meta["sources"])
    _atomic_write(out / FRAGMENT, config_fragment(out, meta["latents"], splits).encode())
    _atomic_write(out / METADATA, (json.dumps(meta, indent=1) + "\n").encode())


__all__ = [
    "precompute",
    "PrecomputeResult",
    "check_against",
    "find_precompute_dir",
    "load_empty_prompt",
    "config_fragment",
    "fragment_overrides",
    "launch_rank",
    "probe_image",
]
