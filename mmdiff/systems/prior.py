"""unCLIP prior: a diffusion model over CLIP image embeddings conditioned on the caption (``system: prior``).

The CLIP of ``model.clip`` computes both sides from image–caption shards: the target x0 is
the image's embedding and the condition the caption's text embedding and token states (all in the
:func:`~mmdiff.models.prior_net.scaled_embedding` convention); it is frozen unless
``model.clip.freeze: false``, which trains its text tower with the prior
(:mod:`mmdiff.systems.text_training`). The denoiser
(:class:`~mmdiff.models.prior_net.PriorTransformer`, ``model.prior``) predicts x0 as in the paper
(``diffusion.prediction_type: sample``); captions are replaced by the empty prompt in
``model.caption_dropout`` of the rows, for classifier-free guidance at sampling.

Validation logs ``val/loss`` and, from embeddings sampled for the validation captions,
``val/cos_prior`` (mean cosine of predicted vs true image embedding) beside ``val/cos_text``
(mean cosine of the caption's text embedding vs the true image embedding): the prior is useful
when the first exceeds the second.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from mmdiff.diffusion import GaussianDiffusion, SamplingOptions
from mmdiff.models.clip import ClipEncoder
from mmdiff.models.prior_net import PriorTransformer, scaled_embedding
from mmdiff.systems import text_training
from mmdiff.systems.base import System, valid_rows
from mmdiff.systems.registry import register_system

log = logging.getLogger(__name__)


@register_system("prior")
class PriorSystem(System):
    """Text → CLIP image embedding by Gaussian diffusion over the embedding."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        p = cfg.model.prior
        self.clip = ClipEncoder.from_config(cfg.model.clip)
        text_training.train_text_tower(self.clip, pooled=True)
        self.embed_dim = self.clip.embed_dim
        self.prior = PriorTransformer(
            self.embed_dim, self.clip.text_width, width=p.width, layers=p.layers, heads=p.heads,
            mlp_ratio=p.mlp_ratio, dropout=p.dropout, text_tokens=p.text_tokens,
        )
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self.save_config()

    @classmethod
    def from_checkpoint_config(cls, cfg: DictConfig, hparams: Dict[str, Any]) -> "PriorSystem":
        """Build the architecture only; weights (the CLIP's too) come from the checkpoint."""
        cfg.model.clip.pretrained = None
        return cls(cfg)

    @property
    def ema_target(self) -> torch.nn.Module:
        """The prior transformer, and the text encoder when it trains (``model.clip.freeze: false``)."""
        return text_training.with_text_encoder(self.prior, self.clip)

    def optimizer_parameters(self) -> Any:
        """The prior's parameters; with a trained text encoder, two AdamW groups (its own LR)."""
        return text_training.optimizer_groups(self.prior.parameters(), self.clip, self.cfg.optim)

    # ------------------------------------------------------------------------------ encoders
    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → scaled CLIP image embeddings B×E."""
        pooled, _ = self.clip.encode_image(images.to(self.device))
        return scaled_embedding(pooled)

    def encode_prompts(self, prompts: List[str]) -> Dict[str, torch.Tensor]:
        """Prompts → ``{"text_embed" B×E (scaled), "text_states" B×L×D, "text_mask" B×L}``
        (with gradients only into a trained text encoder, ``model.clip.freeze: false``)."""
        tokens = self.clip.tokenize(list(prompts)).to(self.device)
        states, pooled = self.clip.encode_text(tokens)
        mask = tokens != 0
        # Padding is never attended to: cut it to the longest prompt's length (same result, faster).
        length = max(1, int(mask.sum(dim=1).max()))
        return {"text_embed": scaled_embedding(pooled), "text_states": states[:, :length],
                "text_mask": mask[:, :length]}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer as the diffusion process's model function."""
        return self.prior(x_t, t, cond["text_embed"], cond["text_states"], cond["text_mask"])

    # ------------------------------------------------------------------------------ training
    def _captions(self, captions: List[str], dropout: float) -> List[str]:
        if dropout <= 0:
            return list(captions)
        drop = (torch.rand(len(captions)) < dropout).tolist()
        return ["" if d else c for c, d in zip(captions, drop)]

    def _loss(self, images: torch.Tensor, captions: List[str], generator=None) -> Dict[str, torch.Tensor]:
        x0 = self.embed_images(images)
        cond = self.encode_prompts(captions)
        return self.diffusion.training_loss(lambda x_t, t: self.denoise(x_t, t, cond), x0, generator=generator)

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = self._captions(list(batch["caption"]), self.cfg.model.caption_dropout)
        out = self._loss(batch["image"], captions)
        self.log_losses("train", out, batch_size=len(captions))
        return out["loss"]

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        keep = valid_rows(batch)
        if not keep:
            return
        images = batch["image"][keep]
        captions = [batch["caption"][i] for i in keep]
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 100003 + batch_idx)
        metrics = {k: v for k, v in self._loss(images, captions, generator=gen).items()}
        cos = self.embedding_cosines(images, captions, seed=self.cfg.seed + batch_idx)
        metrics.update({f"cos_{k}": v.mean() for k, v in cos.items()})
        self.log_losses("val", metrics, batch_size=len(keep))

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: List[str], *, seed: int = 0, progress: bool = False, **options: Any) -> torch.Tensor:
        """Prompts → scaled CLIP image embeddings B×E.

        ``options`` are :class:`SamplingOptions` fields (unset ones take ``sampling:``)
        plus ``candidates``: draws per prompt, of which the one with the highest cosine to the
        prompt's text embedding is kept (default ``model.prior.candidates``).
        """
        if not prompts:
            raise ValueError("sample() needs at least one prompt.")
        candidates = options.pop("candidates", None)
        opts = SamplingOptions.from_mapping(self.cfg.sampling).replace(**options)
        k = int(self.cfg.model.prior.candidates if candidates is None else candidates)
        if k < 1:
            raise ValueError(f"candidates must be positive, got {k}.")
        n = len(prompts) * k
        guided = opts.guidance_scale != 1.0
        # One encoder call for both branches, so their token states have the same length.
        both = self.encode_prompts([p for p in prompts for _ in range(k)] + [""] * (n if guided else 0))
        cond = {key: v[:n] for key, v in both.items()}
        uncond = {key: v[n:] for key, v in both.items()} if guided else None
        x = self.diffusion.sample(
            self.denoise, (n, self.embed_dim), cond=cond, uncond=uncond,
            generator=torch.Generator(device=self.device).manual_seed(seed), device=self.device,
            options=opts, progress=progress,
        )
        x = x.view(len(prompts), k, -1)
        text = cond["text_embed"].view(len(prompts), k, -1)
        best = F.cosine_similarity(x, text, dim=-1).argmax(dim=1)
        return scaled_embedding(x[torch.arange(len(prompts), device=x.device), best])

    @torch.no_grad()
    def embedding_cosines(
        self, images: torch.Tensor, captions: List[str], *, seed: int = 0, **options: Any
    ) -> Dict[str, torch.Tensor]:
        """Per row: cosine of the sampled (``prior``) and of the caption's text embedding
        (``text``) to the image's true CLIP embedding."""
        truth = self.embed_images(images)
        predicted = self.sample(list(captions), seed=seed, **options)
        text = self.encode_prompts(list(captions))["text_embed"]
        return {
            "prior": F.cosine_similarity(predicted, truth, dim=-1),
            "text": F.cosine_similarity(text, truth, dim=-1),
        }
