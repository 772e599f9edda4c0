"""Train the image autoencoder (diffusers ``AutoencoderKL``) that latent diffusion runs in.

Objective (per batch of ``{"image": B×3×H×W in [-1, 1]}``)::

    loss = rec + kl_weight · KL / (3·H·W)     [+ d_weight · g_loss + d_loss with a discriminator]

``rec`` is the per-pixel mean L1 or L2 error of the reconstruction of a posterior sample; ``KL``
is the posterior's KL to N(0, I) summed over latent elements, averaged over images. This is
Stable Diffusion's ``LPIPSWithDiscriminator`` objective (without LPIPS) divided by the pixel
count, so ``kl_weight`` means the same as there while the logged numbers stay readable.

With ``use_discriminator`` a PatchGAN (hinge loss) joins from ``disc_start_step``: the generator
term ``-D(x̂)`` is weighted by ``disc_weight`` × SD's adaptive weight (‖∇rec‖ / ‖∇g_loss‖ at
the decoder's last layer). Both nets are trained by *one* AdamW over both parameter sets with
automatic optimisation: the generator term is computed with the discriminator's parameters
frozen and the discriminator term on detached reconstructions, so one backward gives each net
exactly its own gradient. This keeps ``global_step`` = batches, and Lightning's gradient
clipping and accumulation working — which manual optimisation with two optimisers would not.

Logs ``train/loss``, ``train/rec``, ``train/kl`` (and ``train/g_loss``, ``train/d_loss``,
``train/d_weight``); validation logs ``val/loss``, ``val/psnr``, ``val/ssim`` on reconstructions
of the posterior mean of the real rows (``batch["valid"]``), and keeps the first validation
batch's ``(originals, reconstructions)``
(≤ 8 images each, CPU, [-1, 1]) in ``self.val_images``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from omegaconf import DictConfig

from mmdiff.config import ReconLoss, from_container
from mmdiff.eval.image_metrics import psnr, ssim
from mmdiff.models.discriminator import PatchDiscriminator, hinge_d_loss
from mmdiff.models.vae import build_vae
from mmdiff.systems.base import System
from mmdiff.systems.registry import register_system

log = logging.getLogger(__name__)

# How many (original, reconstruction) pairs validation keeps for image logging.
N_VAL_IMAGES = 8


def _plain(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A diffusers config as plain lists/dicts, so checkpoints load with weights_only=True."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items()}


@register_system("autoencoder")
class AutoencoderSystem(System):
    """Reconstruction + KL (+ optional PatchGAN) training of ``model.vae``."""

    def __init__(
        self,
        cfg: DictConfig | Mapping[str, Any] | None = None,
        vae_config: Optional[Mapping[str, Any]] = None,
        *,
        config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """``cfg``: the experiment config. ``vae_config``: a saved diffusers VAE config to build
        the architecture from instead of ``model.vae`` (used when rebuilding from a checkpoint;
        ``config=`` is the hyper-parameter name, so ``load_from_checkpoint`` works too)."""
        cfg = cfg if cfg is not None else config
        if cfg is None:
            raise TypeError("AutoencoderSystem needs the experiment config.")
        if not isinstance(cfg, DictConfig):  # a plain dict from a checkpoint
            cfg = from_container(dict(cfg))
        super().__init__(cfg)
        v = cfg.model.vae
        vae = AutoencoderKL.from_config(dict(vae_config)) if vae_config else build_vae(v)
        self.vae = vae.train()
        self.discriminator: Optional[PatchDiscriminator] = None
        if v.use_discriminator:
            self.discriminator = PatchDiscriminator(
                in_channels=int(v.in_channels),
                channels=int(v.disc_channels),
                n_layers=int(v.disc_layers),
            )
        self.val_images: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.save_config(vae_config=_plain(vae.config))

    @classmethod
    def from_checkpoint_config(
        cls, cfg: DictConfig, hparams: Mapping[str, Any]
    ) -> "AutoencoderSystem":
        """Build the architecture only (weights come from the checkpoint's state dict)."""
        cfg.model.vae.pretrained = None
        return cls(cfg, vae_config=hparams.get("vae_config"))

    # ------------------------------------------------------------------------------ losses
    def _rec_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kind = ReconLoss(self.cfg.model.vae.recon_loss)
        if kind == ReconLoss.l2:
            return F.mse_loss(recon, target)
        return F.l1_loss(recon, target)

    def _vae_loss(self, x: torch.Tensor, sample: bool) -> Dict[str, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        recon = self.vae.decode(z).sample
        rec = self._rec_loss(recon, x)
        kl = posterior.kl().mean()
        loss = rec + self.cfg.model.vae.kl_weight * kl / x[0].numel()
        return {"loss": loss, "rec": rec, "kl": kl, "recon": recon}

    def _adaptive_weight(self, rec: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        last = self.vae.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach()

    def _adversarial(self, x: torch.Tensor, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        assert self.discriminator is not None
        v = self.cfg.model.vae
        factor = 1.0 if self.global_step >= v.disc_start_step else 0.0
        # Generator term: gradients reach the VAE only.
        self.discriminator.requires_grad_(False)
        g_loss = -self.discriminator(out["recon"]).mean()
        self.discriminator.requires_grad_(True)
        if factor > 0 and torch.is_grad_enabled():
            d_weight = self._adaptive_weight(out["rec"], g_loss) * v.disc_weight
        else:
            d_weight = torch.zeros((), device=x.device)
        # Discriminator term: gradients reach the discriminator only. Computed (×0) before the
        # start step too, so every parameter takes part in every step (DDP needs that).
        d_loss = hinge_d_loss(
            self.discriminator(x.detach()), self.discriminator(out["recon"].detach())
        )
        loss = out["loss"] + factor * (d_weight * g_loss + d_loss)
        return {
            "loss": loss, "g_loss": g_loss.detach(), "d_loss": d_loss.detach(), "d_weight": d_weight
        }

    # ------------------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        out = self._vae_loss(x, sample=True)
        logs = {"rec": out["rec"].detach(), "kl": out["kl"].detach()}
        if self.discriminator is not None:
            adv = self._adversarial(x, out)
            out["loss"] = adv["loss"]
            logs.update({k: adv[k] for k in ("g_loss", "d_loss", "d_weight")})
        self.log_losses("train", {"loss": out["loss"].detach(), **logs}, batch_size=x.shape[0])
        return out["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        valid = batch.get("valid")
        if valid is not None:  # rank padding and corrupt samples are placeholders: score real rows only
            x = x[valid.to(x.device)]
        if x.shape[0] == 0:
            return
        out = self._vae_loss(x, sample=False)
        recon = out["recon"].clamp(-1.0, 1.0)
        n = x.shape[0]
        self.log_losses("val", {"loss": out["loss"], "psnr": psnr(recon, x), "ssim": ssim(recon, x)},
                        batch_size=n, prog_bar=("psnr",))
        if batch_idx == 0:
            k = min(N_VAL_IMAGES, n)
            self.val_images = (x[:k].detach().float().cpu(), recon[:k].detach().float().cpu())

    # ------------------------------------------------------------------------------ previews
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → reconstructions from the posterior mean, clamped to [-1, 1]."""
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return self.vae.decode(posterior.mode()).sample.float().clamp(-1.0, 1.0)

    def preview_images(self) -> Dict[str, Any]:
        """For the image-logging callback: originals (top row) over current reconstructions."""
        if self.val_images is None:
            return {}
        originals = self.val_images[0]
        recon = self.reconstruct(originals).cpu()
        return {"reconstructions": (torch.cat([originals, recon]), originals.shape[0])}


__all__ = ["AutoencoderSystem"]
