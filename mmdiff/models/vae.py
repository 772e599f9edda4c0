"""The image autoencoder: a diffusers ``AutoencoderKL`` built from ``model.vae`` or loaded.

``model.vae.pretrained`` may be

- ``None`` — build a random-init VAE from the config fields (``block_out_channels`` sets the
  depth: ``len(block_out_channels) - 1`` down-samplings by 2);
- a local diffusers folder (``save_pretrained`` output, or a pipeline folder with ``vae/``) —
  architecture and weights come from the folder; nothing is downloaded;
- a ``.safetensors`` (or ``.pt``/``.pth``/``.bin``) state dict — in diffusers key names, or in the
  original CompVis/Stable Diffusion layout (``first_stage_model.encoder.down.0…`` or bare
  ``encoder.down.0…``), which is converted with diffusers' own converter. The architecture comes
  from the config fields, which must match the file (SD's VAE: ``block_out_channels: [128, 256,
  512, 512]``, ``layers_per_block: 2``, ``latent_channels: 4``);
- an mmdiff Lightning ``.ckpt`` (autoencoder, or text_to_image) — weights under ``vae.``,
  architecture read from the checkpoint's hyper-parameters (the VAE's saved diffusers config,
  else the saved ``model.vae`` section), so it need not be repeated. A ``.ckpt`` without mmdiff
  hyper-parameters is read as a plain/CompVis state dict.

Every load is strict: a file that does not fit the architecture is a
:class:`~mmdiff.errors.CheckpointError` naming a few offending keys.

Half precision (``model.vae.precision: fp16``; rarely ``bf16``) can overflow inside the encoder and
give NaN or Inf latents for some images — Stable Diffusion's original VAE is known for it in fp16.
:func:`encode_finite` encodes in the VAE's own dtype and, when the posterior is not finite,
encodes that batch again in float32 (logging a warning once per process): half-precision speed
for the batches that allow it, correct latents for all.

``vae.config.scaling_factor`` holds ``model.vae.scaling_factor`` when that is set; otherwise a
freshly built VAE gets 1.0 (meaning "not known yet: estimate it with
:func:`estimate_scaling_factor`") and a loaded diffusers VAE keeps its own value (SD: 0.18215).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
import torch
from diffusers import AutoencoderKL
from omegaconf import DictConfig, OmegaConf

from mmdiff.config import VAEConfig
from mmdiff.io.weights import ignored_key, load_state_dict_file, load_strict, safe_torch_load
from mmdiff.errors import CheckpointError
from mmdiff.models.dtypes import diffusers_folder

log = logging.getLogger(__name__)

# Prefix of the VAE's weights in an mmdiff Lightning checkpoint (the systems' attribute name).
CKPT_PREFIX = "vae."


def _missing(path: str) -> CheckpointError:
    return CheckpointError(
        f"VAE weights '{path}' do not exist; set model.vae.pretrained to a diffusers folder, "
        "a .safetensors file or an mmdiff autoencoder checkpoint."
    )


def _block_types(n: int) -> dict[str, tuple[str, ...]]:
    return {
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
    }


def _arch_kwargs(cfg: Any) -> dict[str, Any]:
    channels = tuple(int(c) for c in cfg.block_out_channels)
    return dict(
        in_channels=int(cfg.in_channels),
        out_channels=int(cfg.in_channels),
        block_out_channels=channels,
        layers_per_block=int(cfg.layers_per_block),
        latent_channels=int(cfg.latent_channels),
        norm_num_groups=int(cfg.norm_num_groups),
        scaling_factor=float(cfg.scaling_factor) if cfg.scaling_factor is not None else 1.0,
        **_block_types(len(channels)),
    )


def _ignored(cfg: Any) -> list[str]:
    """``model.vae.ignore_keys``: names/patterns the strict load may skip."""
    return list(getattr(cfg, "ignore_keys", None) or [])


def _built(cfg: Any) -> AutoencoderKL:
    return AutoencoderKL(**_arch_kwargs(cfg))


# ----------------------------------------------------------------------------- loading paths
def _from_folder(path: Path, cfg: DictConfig) -> AutoencoderKL:
    folder, sub = diffusers_folder(path, "vae")
    try:
        vae, info = AutoencoderKL.from_pretrained(
            str(folder), subfolder=sub, local_files_only=True, output_loading_info=True,
            low_cpu_mem_usage=False,
        )
    except (OSError, ValueError, RuntimeError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"VAE folder '{path}' is not a loadable diffusers AutoencoderKL folder ({first})."
        ) from None
    bad = {k: [key for key in v if not ignored_key(str(key), _ignored(cfg))]
           for k, v in info.items() if k != "error_msgs"}
    bad = {k: v for k, v in bad.items() if v}
    if bad or info.get("error_msgs"):
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:4]))}" for k, v in bad.items())
        raise CheckpointError(f"VAE weights in '{path}' do not fit their config ({detail}).")
    if cfg.scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(cfg.scaling_factor))
    return vae


def _is_ldm_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(
        k.startswith("first_stage_model.") or k.startswith("encoder.down.") for k in state
    )


def _from_state_dict(state: Mapping[str, torch.Tensor], cfg: Any, source: str) -> AutoencoderKL:
    vae = _built(cfg)
    if not any(k.startswith("encoder.") for k in state):
        vae_keys = {k[len(CKPT_PREFIX):]: v for k, v in state.items() if k.startswith(CKPT_PREFIX)}
        if vae_keys:  # an mmdiff single-file export (or system state dict): keep the VAE's weights
            state = vae_keys
    if _is_ldm_layout(state):
        state = convert_ldm_vae_checkpoint(dict(state), _block_types(len(cfg.block_out_channels)))
    load_strict(vae, state, f"VAE ('{source}')", ignore_keys=_ignored(cfg))
    return vae


def _ckpt_vae_config(ckpt: Mapping[str, Any], source: str) -> Optional[DictConfig]:
    """The ``model.vae`` section saved in an mmdiff checkpoint's hyper-parameters, if any."""
    hp = ckpt.get("hyper_parameters") or {}
    saved = ((hp.get("config") or {}).get("model") or {}).get("vae")
    if not isinstance(saved, Mapping):
        return None
    schema = OmegaConf.structured(VAEConfig)
    known = {k: v for k, v in saved.items() if k in schema}
    try:
        merged = OmegaConf.merge(schema, known)
    except Exception as err:  # noqa: BLE001 - report any schema clash in one line
        raise CheckpointError(
            f"the VAE config saved in '{source}' cannot be read ({str(err).splitlines()[0]})."
        ) from None
    merged.pretrained = None
    return merged  # type: ignore[return-value]


def _from_lightning_ckpt(path: Path, cfg: DictConfig) -> AutoencoderKL:
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(f"'{path}' holds no state dict; pass an mmdiff autoencoder checkpoint.")
    state = ckpt["state_dict"]
    hp = ckpt.get("hyper_parameters") or {}
    saved_config = hp.get("vae_config")  # the built VAE's own diffusers config, when saved
    arch = _ckpt_vae_config(ckpt, str(path))
    if arch is None and not isinstance(saved_config, Mapping):
        # not an mmdiff checkpoint: a plain or CompVis state dict in a .ckpt file
        return _from_state_dict(state, cfg, str(path))
    vae_state = {k[len(CKPT_PREFIX):]: v for k, v in state.items() if k.startswith(CKPT_PREFIX)}
    if not vae_state:
        raise CheckpointError(
            f"checkpoint '{path}' holds no '{CKPT_PREFIX}*' weights; pass an mmdiff autoencoder "
            "checkpoint."
        )
    if isinstance(saved_config, Mapping):
        vae = AutoencoderKL.from_config(dict(saved_config))
        if cfg.scaling_factor is not None:
            vae.register_to_config(scaling_factor=float(cfg.scaling_factor))
    else:
        assert arch is not None
        if cfg.scaling_factor is not None:
            arch.scaling_factor = cfg.scaling_factor
        vae = _built(arch)
    load_strict(vae, vae_state, f"VAE ('{path}')", ignore_keys=_ignored(cfg))
    return vae


def build_vae(cfg: DictConfig) -> AutoencoderKL:
    """An ``AutoencoderKL`` from a ``model.vae`` config section (see the module docstring).

    Returned in fp32 and eval mode (as diffusers' ``from_pretrained`` does, whichever the path);
    callers freeze it / cast it to ``cfg.precision`` as needed.
    """
    if cfg.pretrained is None:
        return _built(cfg).eval()
    path = Path(str(cfg.pretrained)).expanduser()
    if not path.exists():
        raise _missing(str(cfg.pretrained))
    if path.is_dir():
        vae = _from_folder(path, cfg)
    elif path.suffix == ".ckpt":
        vae = _from_lightning_ckpt(path, cfg)
    else:
        vae = _from_state_dict(load_state_dict_file(path), cfg, str(path))
    log.info("loaded VAE weights from %s", path)
    return vae.eval()


# ------------------------------------------------------------------------- half-precision guard
_FALLBACK_WARNED: set[torch.dtype] = set()


@contextlib.contextmanager
def _in_float32(vae: AutoencoderKL) -> Iterator[None]:
    """Run ``vae`` in float32 for the ``with`` block, then return it to its dtype.

    The round trip fp16/bf16 → fp32 → fp16/bf16 is exact, so the weights come back unchanged.
    """
    dtype = vae.dtype
    # nn.Module.to, not diffusers' ModelMixin.to, which warns on every dtype change.
    torch.nn.Module.to(vae, torch.float32)
    try:
        yield
    finally:
        torch.nn.Module.to(vae, dtype)


@torch.no_grad()
def encode_finite(vae: AutoencoderKL, images: torch.Tensor) -> Any:
    """``vae.encode(images).latent_dist``, redone in float32 when half precision gives NaN/Inf.

    ``images`` are cast to the VAE's dtype for the first try. Returns diffusers'
    ``DiagonalGaussianDistribution`` (in float32 after a fallback).
    """
    dtype = vae.dtype
    posterior = vae.encode(images.to(dtype)).latent_dist
    if dtype == torch.float32 or bool(torch.isfinite(posterior.parameters).all()):
        return posterior
    if dtype not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(dtype)
        log.warning(
            "the VAE gave non-finite latents in %s; encoding such batches again in float32 "
            "(set model.vae.precision=fp32 to always encode in float32)", str(dtype).replace("torch.", ""),
        )
    with _in_float32(vae):
        return vae.encode(images.float()).latent_dist


# ----------------------------------------------------------------------------------- helpers
def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@torch.no_grad()
def estimate_scaling_factor(
    vae: AutoencoderKL,
    images_iter: Iterable[Any],
    n_batches: int = 4,
    use_mean: bool = False,
) -> float:
    """``1 / std`` of the VAE's latents over the first ``n_batches`` batches.

    Batches are image tensors in [-1, 1], ``(images, …)`` tuples or dicts with ``"image"``. The
    latents are posterior *samples* by default — what the latent diffusion paper and SD did, and
    what a diffusion model trained on ``latent_dist.sample()`` sees; pass ``use_mean=True`` when
    the diffusion model is trained on the posterior mean. The std is taken over all latent
    elements (about their mean): summed in float32 on the VAE's device about each batch's mean, pooled in
    float64 on the CPU (:func:`moments`), so no float64 tensor is made on an accelerator.
    """
    param = next(vae.parameters())
    was_training = vae.training
    vae.eval()
    rows = []
    try:
        for i, batch in enumerate(images_iter):
            if i >= n_batches:
                break
            x = _images(batch).to(device=param.device, dtype=param.dtype)
            dist = vae.encode(x).latent_dist
            rows.append(moments(dist.mean if use_mean else dist.sample()))
    finally:
        vae.train(was_training)
    if not rows:
        raise ValueError("estimate_scaling_factor got no batches; pass a non-empty iterable.")
    count, _, m2 = pool_moments(torch.stack(rows)).tolist()
    var = m2 / count
    if var <= 0.0:
        raise ValueError("the VAE's latents have zero variance; cannot estimate a scaling factor.")
    return 1.0 / math.sqrt(var)


def moments(z: torch.Tensor) -> torch.Tensor:
    """``[count, mean, M2]`` of ``z``'s elements (``M2 = Σ(z - mean)²``), float64 on the CPU.

    The sums run in float32 on ``z``'s device about the tensor's own mean, which keeps them
    accurate without float64 there (MPS has none; on GPUs it is slow).
    """
    z = z.detach().float()
    mean = z.mean()
    m2 = (z - mean).square().sum()
    centred = torch.stack([mean, m2]).cpu().double()
    return torch.cat([torch.tensor([float(z.numel())], dtype=torch.float64), centred])


def pool_moments(rows: torch.Tensor) -> torch.Tensor:
    """The ``[count, mean, M2]`` of the union of groups given as rows ``[count, mean, M2]``
    (Chan et al.'s parallel combination), in float64 on the CPU."""
    n, mean, m2 = rows.reshape(-1, 3).cpu().double().unbind(1)
    total = n.sum()
    grand = (n * mean).sum() / total
    return torch.stack([total, grand, (m2 + n * (mean - grand).square()).sum()])


def _folder_channels(path: Path) -> Optional[list[int]]:
    folder, sub = diffusers_folder(path, "vae")
    config = folder / (sub or "") / "config.json"
    if config.is_file():
        return list(json.loads(config.read_text()).get("block_out_channels") or []) or None
    return None


def vae_downsample_factor(cfg: DictConfig | AutoencoderKL) -> int:
    """How many pixels one latent spans per side: ``2 ** (len(block_out_channels) - 1)``.

    Takes a built VAE, or a ``model.vae`` section; for a pretrained diffusers folder or mmdiff
    checkpoint the architecture is read from the folder/checkpoint (without building a model).
    """
    if isinstance(cfg, AutoencoderKL):
        return 2 ** (len(cfg.config.block_out_channels) - 1)
    channels: Optional[list[int]] = None
    if cfg.pretrained is not None:
        path = Path(str(cfg.pretrained)).expanduser()
        if not path.exists():
            raise _missing(str(cfg.pretrained))
        if path.is_dir():
            channels = _folder_channels(path)
        elif path.suffix == ".ckpt":
            ckpt = safe_torch_load(path)
            if isinstance(ckpt, Mapping):
                saved = (ckpt.get("hyper_parameters") or {}).get("vae_config") or {}
                arch = _ckpt_vae_config(ckpt, str(path))
                if saved.get("block_out_channels"):
                    channels = list(saved["block_out_channels"])
                elif arch is not None:
                    channels = list(arch.block_out_channels)
    if channels is None:
        channels = list(cfg.block_out_channels)
    return 2 ** (len(channels) - 1)


__all__ = ["build_vae", "encode_finite", "estimate_scaling_factor", "moments", "pool_moments", "vae_downsample_factor", "CKPT_PREFIX"]
