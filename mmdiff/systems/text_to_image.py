"""Text → image latent diffusion: frozen VAE + frozen open_clip text encoder + trained U-Net.

The system wires models and the diffusion process together; it holds no math of its own
(that is ``mmdiff.diffusion``). Batches are ``{"image": B×3×H×W in [-1, 1], "caption": [str]}``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from diffusers import AutoencoderKL
from omegaconf import DictConfig

from mmdiff.config import VarianceType, to_container
from mmdiff.diffusion import GaussianDiffusion
from mmdiff.models.clip import ClipEncoder
from mmdiff.models.unet import build_unet
from mmdiff.models.vae import build_vae
from mmdiff.systems.common import configure_adamw
from mmdiff.systems.registry import register_system

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _plain(config: Dict[str, Any]) -> Dict[str, Any]:
    """A diffusers config as plain lists/dicts, so checkpoints load with weights_only=True."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items()}


@register_system("text_to_image")
class TextToImageSystem(L.LightningModule):
    """Latent diffusion conditioned on open_clip token states (and optionally pooled text)."""

    def __init__(self, cfg: DictConfig, vae_config: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        vae = AutoencoderKL.from_config(vae_config) if vae_config else build_vae(m.vae)
        self.vae_dtype = _DTYPES[str(getattr(m.vae.precision, "value", m.vae.precision))]
        self.vae = vae.to(self.vae_dtype).requires_grad_(False).eval()
        self.clip = ClipEncoder.from_config(m.clip)
        self.latent_channels = int(vae.config.latent_channels)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_size = cfg.data.image_size // factor
        self.learned_variance = VarianceType(cfg.diffusion.variance_type) == VarianceType.learned_range
        self.unet = build_unet(
            m.unet,
            latent_channels=self.latent_channels,
            sample_size=self.latent_size,
            cross_attention_dim=m.unet.cross_attention_dim or self.clip.text_width,
            pooled_dim=self.clip.embed_dim if m.unet.use_pooled_text else None,
            learned_variance=self.learned_variance,
        )
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        scale = m.vae.scaling_factor
        self.register_buffer("latent_scale", torch.tensor(float(scale) if scale else 0.0))
        self.save_hyperparameters({"config": to_container(cfg), "vae_config": _plain(vae.config)})

    @classmethod
    def from_checkpoint_config(cls, cfg: DictConfig, hparams: Dict[str, Any]) -> "TextToImageSystem":
        """Build the architecture only; weights come from the checkpoint's state dict."""
        cfg.model.clip.pretrained = None
        cfg.model.unet.pretrained = None
        return cls(cfg, vae_config=hparams["vae_config"])

    # ------------------------------------------------------------------------------ plumbing
    @property
    def ema_target(self) -> torch.nn.Module:
        return self.unet

    def train(self, mode: bool = True) -> "TextToImageSystem":
        super().train(mode)
        self.vae.eval()
        return self

    def configure_optimizers(self) -> Dict[str, Any]:
        return configure_adamw(self.unet.parameters(), self.cfg.optim, self.cfg.trainer.max_steps)

    # ------------------------------------------------------------------------------ encoders
    def encode_prompts(self, prompts: List[str]) -> Dict[str, torch.Tensor]:
        """Prompts → ``{"context": B×L×D, "pooled": B×E}`` from the frozen text encoder."""
        tokens = self.clip.tokenize(list(prompts)).to(self.device)
        states, pooled = self.clip.encode_text(tokens)
        return {"context": states.float(), "pooled": pooled.float()}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (posterior sample, or its mean when ``sample=False``)."""
        posterior = self.vae.encode(images.to(self.vae_dtype)).latent_dist
        z = posterior.sample() if sample else posterior.mean
        return z.float() * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1]."""
        images = self.vae.decode((latents / self.latent_scale).to(self.vae_dtype)).sample
        return images.float().clamp(-1, 1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net as the diffusion process's model function."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        kwargs: Dict[str, Any] = {}
        if self.cfg.model.unet.use_pooled_text:
            kwargs["class_labels"] = cond["pooled"].to(x_t.dtype)
        return self.unet(x_t, t, encoder_hidden_states=cond["context"].to(x_t.dtype), **kwargs).sample

    # ------------------------------------------------------------------------------ training
    def _drop_captions(self, captions: List[str]) -> List[str]:
        p = self.cfg.model.caption_dropout
        if p <= 0:
            return list(captions)
        keep = torch.rand(len(captions)) >= p
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def on_train_start(self) -> None:
        if float(self.latent_scale) == 0.0:
            self._estimate_latent_scale()

    @torch.no_grad()
    def _estimate_latent_scale(self) -> None:
        """Set ``latent_scale`` to 1/std of the first N batches' latents (all ranks pooled)."""
        n_batches = self.cfg.model.vae.scale_estimate_batches
        loader = self.trainer.datamodule.train_dataloader()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            z = self.vae.encode(batch["image"].to(self.device, self.vae_dtype)).latent_dist.sample()
            z = z.double()
            total += torch.stack([z.sum(), (z * z).sum(), torch.tensor(z.numel(), device=self.device)])
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        mean = total[0] / total[2]
        std = torch.sqrt(total[1] / total[2] - mean * mean)
        self.latent_scale.fill_(float(1.0 / std))
        log.info("latent scale estimated from %d batches: %.5f", n_batches, float(self.latent_scale))

    def _loss(self, batch: Dict[str, Any], captions: List[str], generator=None, sample: bool = True):
        latents = self.encode_images(batch["image"], sample=sample)
        cond = self.encode_prompts(captions)
        return self.diffusion.training_loss(
            lambda x_t, t: self.denoise(x_t, t, cond), latents, generator=generator
        )

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._loss(batch, self._drop_captions(batch["caption"]))
        bs = batch["image"].shape[0]
        for name, value in out.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        # The loader pads ranks to equal length with valid=False placeholders; score real ones only.
        valid = batch.get("valid", torch.ones(len(batch["caption"]), dtype=torch.bool))
        if not bool(valid.any()):
            return
        keep = valid.nonzero().flatten().tolist()
        batch = {"image": batch["image"][valid], "caption": [batch["caption"][i] for i in keep]}
        # Fixed noise and timesteps per batch index, so validation losses are comparable over time.
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 100003 + batch_idx)
        out = self._loss(batch, batch["caption"], generator=gen, sample=False)
        bs = batch["image"].shape[0]
        for name, value in out.items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=bs)

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: List[str],
        *,
        seed: int = 0,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        guidance_rescale: Optional[float] = None,
        eta: Optional[float] = None,
        temperature: Optional[float] = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Prompts → images B×3×H×W in [-1, 1]; unset options take the config's ``sampling:``."""
        if not prompts:
            raise ValueError("sample() needs at least one prompt.")
        s = self.cfg.sampling
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts)) if scale != 1.0 else None
        latents = self.diffusion.sample(
            self.denoise,
            (len(prompts), self.latent_channels, self.latent_size, self.latent_size),
            cond=cond,
            uncond=uncond,
            sampler=sampler or s.sampler,
            steps=steps or s.steps,
            guidance_scale=scale,
            guidance_rescale=s.guidance_rescale if guidance_rescale is None else guidance_rescale,
            eta=s.eta if eta is None else eta,
            temperature=s.temperature if temperature is None else temperature,
            timestep_spacing=str(getattr(s.timestep_spacing, "value", s.timestep_spacing)),
            generator=generator,
            device=self.device,
            progress=progress,
        )
        return self.decode_latents(latents)

    def preview_images(self) -> Dict[str, Any]:
        """Fixed prompts × 4 fixed seeds, one column per prompt (for the image-logging callback)."""
        prompts = list(self.cfg.sampling.prompts)
        if not prompts:
            return {}
        rows = [self.sample(prompts, seed=self.cfg.sampling.seed + r) for r in range(4)]
        return {"samples": (torch.cat(rows), len(prompts))}

