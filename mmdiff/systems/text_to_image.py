"""Text → image latent diffusion: frozen VAE + open_clip text encoder + trained U-Net.

The text encoder is frozen unless ``model.clip.freeze: false``, which trains its text tower too
(:mod:`mmdiff.systems.text_training`).

The system wires models and the diffusion process together; it holds no math of its own
(that is ``mmdiff.diffusion``). Batches are ``{"image": B×3×H×W in [-1, 1], "caption": [str]}``,
or with ``model.precomputed`` the arrays ``mmdiff precompute`` wrote (``latent`` = unscaled VAE
posterior mean or sample, optional ``latent_logvar``, ``context``, ``pooled``): the frozen
encoders are then skipped, and caption dropout swaps in the stored empty-prompt states.
With ``model.image_embed_conditioning`` it is also the unCLIP decoder, conditioned on the CLIP
image embedding (:mod:`mmdiff.systems.image_embed`). With ``model.lora.rank > 0`` only low-rank
adapters train and are checkpointed (:mod:`mmdiff.systems.lora_training`).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
from diffusers import AutoencoderKL
from omegaconf import DictConfig

from mmdiff.config import VarianceType
from mmdiff.config.diffusion import sample_size_problem
from mmdiff.config.image_sizes import parse_sizes
from mmdiff.data.precomputed import check_against, find_precompute_dir
from mmdiff.diffusion import GaussianDiffusion, SamplingOptions
from mmdiff.config.pipeline import read_pipeline_info
from mmdiff.models.clip import ClipEncoder
from mmdiff.models.lora import set_lora_scale
from mmdiff.models.pipelines import (
    PipelineParts,
    build_pipeline_components,
    load_pipeline_components,
    uses_time_ids,
)
from mmdiff.models.prior_net import ImageEmbedTokens, scaled_embedding
from mmdiff.models.unet import build_unet
from mmdiff.models.vae import build_vae, encode_finite, moments, pool_moments
from mmdiff.errors import CheckpointError, ConfigError, DataError
from mmdiff.systems import image_embed, lora_training, text_training
from mmdiff.systems.base import System
from mmdiff.systems.registry import register_system
from mmdiff.systems.speed import prepare_unet

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _plain(config: Dict[str, Any]) -> Dict[str, Any]:
    """A diffusers config as plain lists/dicts, so checkpoints load with weights_only=True."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items()}


@register_system("text_to_image")
class TextToImageSystem(System):
    """Latent diffusion conditioned on open_clip token states (and optionally pooled text)."""

    def __init__(self, cfg: DictConfig, vae_config: Optional[Dict[str, Any]] = None,
                 pipeline: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(cfg)
        m = cfg.model
        # model.pretrained: VAE, U-Net and text encoder(s) from a pipeline folder, or (``pipeline``,
        # from a checkpoint's hyper-parameters) their architectures without the folder.
        parts = self._pipeline_parts(cfg, vae_config, pipeline)
        if parts is not None:
            vae = parts.vae
        else:
            vae = AutoencoderKL.from_config(vae_config) if vae_config else build_vae(m.vae)
        self.vae_dtype = _DTYPES[m.vae.precision]
        # nn.Module.to, not diffusers' ModelMixin.to, which warns on every dtype change.
        self.vae = torch.nn.Module.to(vae, self.vae_dtype).requires_grad_(False).eval()
        self.clip = parts.text if parts is not None else ClipEncoder.from_config(m.clip)
        self.latent_channels = int(vae.config.latent_channels)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_size = cfg.data.image_size // self.vae_factor  # the default (square) sample's side
        self.learned_variance = VarianceType(cfg.diffusion.variance_type) == VarianceType.learned_range
        self.image_embed_mode = image_embed.mode_of(cfg)
        self.unet = parts.unet if parts is not None else build_unet(
            m.unet,
            latent_channels=self.latent_channels,
            sample_size=self.latent_size,
            cross_attention_dim=m.unet.cross_attention_dim or self.clip.text_width,
            pooled_dim=self.clip.embed_dim if m.unet.use_pooled_text else None,
            learned_variance=self.learned_variance,
            time_cond_dim=self.clip.embed_dim if self.image_embed_mode in ("time", "both") else None,
        )
        self.image_tokens = ImageEmbedTokens(self.clip.embed_dim, m.image_embed_tokens, self.clip.text_width) \
            if self.image_embed_mode in ("tokens", "both") else None
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        scale = m.vae.scaling_factor
        self.register_buffer("latent_scale", torch.tensor(float(scale) if scale else 0.0))
        self.precomputed = bool(m.precomputed)
        self._empty_states: Optional[Dict[str, torch.Tensor]] = None  # see empty_prompt_states()
        self.speed: Dict[str, Any] = {}  # the U-Net speed switches applied (configure_model)
        if m.init_from is not None:
            image_embed.init_from_checkpoint(self, m.init_from)
        # SDXL: the U-Net also takes the pooled text and size/crop ids (``added_cond_kwargs``), and
        # the unconditional branch is all zeros when the pipeline says force_zeros_for_empty_prompt.
        self.micro_conditioning = uses_time_ids(self.unet)
        # Whether the U-Net reads the pooled text (class embedding, or SDXL's text_embeds): without it
        # the parameters only the pooled output depends on stay frozen (they would get no gradient).
        self.uses_pooled_text = bool(m.unet.use_pooled_text) or self.micro_conditioning
        if m.micro_conditioning_dropout > 0 and not self.micro_conditioning:
            raise ConfigError("model.micro_conditioning_dropout is for SDXL U-Nets (size/crop ids); this U-Net "
                              "takes none: remove the key.")
        text_training.train_text_tower(self.clip, pooled=self.uses_pooled_text)
        self.zero_empty_prompt = bool(parts.meta["force_zeros_for_empty_prompt"]) if parts is not None else False
        self.lora = lora_training.lora_section(cfg)
        if self.lora is not None:  # after every base weight is in place
            lora_training.add_adapters(self, self.lora)
        # Sampled sides must pass every U-Net down-sampling whole, in latent cells.
        unet_factor = 2 ** sum(1 for block in self.unet.down_blocks if getattr(block, "downsamplers", None))
        self.size_multiple = self.vae_factor * unet_factor
        for width, height in parse_sizes(cfg.sampling.sizes, "sampling.sizes"):
            problem = sample_size_problem(width, height, self.size_multiple)
            if problem:
                raise ConfigError(f"sampling.sizes: {problem}")
        extra = {"pipeline": parts.meta} if parts is not None else {}
        self.save_config(vae_config=_plain(vae.config), **extra)

    @staticmethod
    def _pipeline_parts(cfg: DictConfig, vae_config: Optional[Dict[str, Any]],
                        pipeline: Optional[Dict[str, Any]]) -> Optional[PipelineParts]:
        m = cfg.model
        if m.get("pretrained") is None:
            return None
        text = {"freeze_text": bool(m.clip.freeze), "text_precision": str(m.clip.precision)}
        if pipeline is not None and vae_config is not None:
            parts = build_pipeline_components(pipeline, vae_config, **text)
            if m.vae.scaling_factor is not None:
                parts.vae.register_to_config(scaling_factor=float(m.vae.scaling_factor))
            return parts
        return load_pipeline_components(m.pretrained, read_pipeline_info(m.pretrained),
                                        scaling_factor=m.vae.scaling_factor, **text)

    @classmethod
    def from_checkpoint_config(cls, cfg: DictConfig, hparams: Dict[str, Any]) -> "TextToImageSystem":
        """Build the architecture only; weights come from the checkpoint's state dict."""
        if lora_training.lora_section(cfg) is not None:
            return cls._from_lora_checkpoint_config(cfg, hparams)
        cfg.model.clip.pretrained = None
        cfg.model.unet.pretrained = None
        cfg.model.init_from = None
        return cls(cfg, vae_config=hparams["vae_config"], pipeline=hparams.get("pipeline"))

    # ------------------------------------------------------------------------------ LoRA
    @classmethod
    def _from_lora_checkpoint_config(cls, cfg: DictConfig, hparams: Dict[str, Any]) -> "TextToImageSystem":
        """A LoRA checkpoint holds the adapters only: the base weights are read again from where the
        config says (model.pretrained, init_from, unet/clip/vae.pretrained)."""
        vae_from_file = cfg.model.vae.pretrained is not None or cfg.model.get("pretrained") is not None
        return cls(cfg, vae_config=None if vae_from_file else hparams["vae_config"])

    def optional_checkpoint_keys(self) -> Set[str]:
        """Under LoRA: the frozen base weights the config reads again (left out of checkpoints)."""
        return lora_training.rebuilt_keys(self) if self.lora is not None else set()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if self.lora is not None:
            lora_training.filter_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if self.lora is not None:  # Lightning loads it unstrictly (the base is left out): check here
            problem = self.weights_mismatch(checkpoint["state_dict"])
            if problem:
                raise CheckpointError(f"the checkpoint's weights do not fit this LoRA model: {problem}; "
                                      "resume with the config it was trained with.")

    @contextlib.contextmanager
    def lora_scaled(self, scale: Optional[float]) -> Iterator[None]:
        """Inside the block the adapters' output is multiplied by ``scale`` (None: unchanged; 0: the base model)."""
        if scale is None:
            yield
            return
        if self.lora is None:
            raise ValueError("lora_scale needs a model trained with LoRA adapters (model.lora.rank > 0).")
        with set_lora_scale(self, float(scale)):
            yield

    # ------------------------------------------------------------------------------ plumbing
    def _denoiser(self) -> torch.nn.Module:
        """What the diffusion loss trains besides the text encoder: the U-Net (+ image-embedding tokens)."""
        if self.image_tokens is not None:  # trained beside the U-Net (a view, not a registered module)
            return torch.nn.ModuleList([self.unet, self.image_tokens])
        return self.unet

    @property
    def ema_target(self) -> torch.nn.Module:
        """The denoiser, and the text encoder when it trains (``model.clip.freeze: false``)."""
        return text_training.with_text_encoder(self._denoiser(), self.clip)

    def optimizer_parameters(self) -> Any:
        """The denoiser's parameters; with a trained text encoder, two AdamW groups (its own LR)."""
        return text_training.optimizer_groups(self._denoiser().parameters(), self.clip, self.cfg.optim)

    def train(self, mode: bool = True) -> "TextToImageSystem":
        super().train(mode)
        self.vae.eval()
        return self

    def configure_model(self) -> None:
        """Speed switches (``model.unet.channels_last/compile/gradient_checkpointing``); ``fit`` sets TF32."""
        if self.speed:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        self.speed = prepare_unet(self.unet, self.cfg.model.unet, device)

    def _frozen(self):
        """Frozen encoders run in their own configured dtype, outside any mixed-precision autocast."""
        return torch.autocast(self.device.type, enabled=False)

    # ------------------------------------------------------------------------------ encoders
    def encode_prompts(self, prompts: List[str]) -> Dict[str, torch.Tensor]:
        """Prompts → ``{"context": B×L×D, "pooled": B×E}`` from the text encoder (a trained one
        runs under the trainer's autocast and passes gradients)."""
        tokens = self.clip.tokenize(list(prompts)).to(self.device)
        with self._frozen() if self.clip.frozen else contextlib.nullcontext():
            states, pooled = self.clip.encode_text(tokens)
        return {"context": states.float(), "pooled": pooled.float()}

    @torch.no_grad()
    def encode_posterior(self, images: torch.Tensor) -> Any:
        """Images in [-1, 1] → the VAE's (unscaled) posterior ``DiagonalGaussianDistribution``.

        Encoded in ``model.vae.precision``; a batch whose half-precision latents are not finite is
        encoded again in float32 (:func:`mmdiff.models.vae.encode_finite`).
        """
        with self._frozen():
            return encode_finite(self.vae, images.to(self.device))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (posterior sample, or its mean when ``sample=False``)."""
        posterior = self.encode_posterior(images)
        z = posterior.sample() if sample else posterior.mean
        return z.float() * self.latent_scale

    def _raw_latents(self, batch: Dict[str, Any], sample: bool = True) -> torch.Tensor:
        """Unscaled float32 latents of a batch: VAE-encoded images, or the precomputed arrays."""
        if not self.precomputed:
            posterior = self.encode_posterior(batch["image"])
            return (posterior.sample() if sample else posterior.mean).float()
        if "latent" not in batch:
            raise DataError(
                "model.precomputed is true but the batch has no 'latent' array; train from "
                "`mmdiff precompute` shards with data.array_keys=[latent,latent_logvar,context,pooled]."
            )
        z = batch["latent"].to(self.device).float()
        logvar = batch.get("latent_logvar")
        if sample and logvar is not None:  # a fresh posterior draw, as online encoding makes
            z = z + torch.exp(0.5 * logvar.to(self.device).float()) * torch.randn_like(z)
        return z

    def batch_latents(self, batch: Dict[str, Any], sample: bool = True) -> torch.Tensor:
        """Scaled latents for the diffusion loss (``sample=False``: the posterior mean)."""
        return self._raw_latents(batch, sample) * self.latent_scale

    def empty_prompt_states(self) -> Dict[str, torch.Tensor]:
        """``{"context": 1×L×D, "pooled": 1×E}`` of the empty prompt (caption dropout's target).

        Training from precomputed shards uses the states stored beside them (``empty_prompt.npz``,
        loaded in ``on_fit_start``); otherwise they come from the text encoder, once.
        """
        if self._empty_states is None:
            self._empty_states = self.encode_prompts([""])
            if self.zero_empty_prompt:  # SDXL: the unconditional branch is all zeros
                self._empty_states = {k: torch.zeros_like(v) for k, v in self._empty_states.items()}
        return {k: v.to(self.device) for k, v in self._empty_states.items()}

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → scaled CLIP image embeddings B×E (the unCLIP decoder's condition)."""
        with self._frozen():
            pooled, _ = self.clip.encode_image(images.to(self.device))
        return scaled_embedding(pooled)

    def batch_condition(
        self, batch: Dict[str, Any], drop: Optional[torch.Tensor] = None,
        image_drop: Optional[torch.Tensor] = None, size_drop: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Text (and image-embedding) conditioning of a batch; rows where ``drop`` is True get the
        empty prompt's states, rows where ``image_drop`` is True a zero image embedding, rows where
        ``size_drop`` is True SDXL's default size/crop ids."""
        if not self.precomputed:
            captions = list(batch["caption"])
            if drop is not None and not self.zero_empty_prompt:
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            cond = self.encode_prompts(captions)
            if drop is not None and self.zero_empty_prompt:
                cond = self._empty_rows(cond, drop)
            if self.image_embed_mode != "none":
                cond["image_embed"] = image_embed.zero_rows(self.embed_images(batch["image"]), image_drop)
        else:
            cond = {"context": batch["context"].to(self.device).float()}
            if "pooled" in batch:
                cond["pooled"] = batch["pooled"].to(self.device).float()
            if drop is not None and bool(drop.any()):
                cond = self._empty_rows(cond, drop)
        if self.micro_conditioning:
            cond["time_ids"] = self._batch_time_ids(batch, len(cond["context"]))
            if size_drop is not None:
                default = self.time_ids(1, target_size=tuple(int(v) for v in cond["time_ids"][0, 4:].tolist()))
                cond["time_ids"] = torch.where(size_drop.to(self.device).view(-1, 1), default, cond["time_ids"])
        return cond

    def _empty_rows(self, cond: Dict[str, torch.Tensor], drop: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``cond`` with the rows where ``drop`` is True replaced by the empty prompt's states."""
        empty = self.empty_prompt_states()
        mask = drop.to(self.device)
        return {k: torch.where(mask.view(-1, *([1] * (v.ndim - 1))), empty[k].to(v.dtype), v)
                for k, v in cond.items()}

    # ------------------------------------------------------------------------------ SDXL size/crop ids
    def time_ids(self, n: int, original_size: Any = None, crop_top_left: Any = None,
                 target_size: Any = None) -> torch.Tensor:
        """SDXL's ``time_ids`` n×6 ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]``.

        Each argument is ``(h, w)`` for all rows or an n×2 tensor; defaults: target = the configured
        image size, original = target, crop = (0, 0) (what diffusers' SDXL pipeline uses).
        """
        size = int(self.cfg.data.image_size)

        def rows(value: Any, default: Any, name: str) -> torch.Tensor:
            t = torch.as_tensor(default if value is None else value).to(self.device, torch.float32)
            t = t.expand(n, 2) if t.ndim == 1 else t
            if tuple(t.shape) != (n, 2):
                raise ValueError(f"{name} must be (height, width) or {n}×2, got shape {tuple(t.shape)}.")
            return t

        target = rows(target_size, (size, size), "target_size")
        return torch.cat([rows(original_size, target, "original_size"), rows(crop_top_left, (0, 0), "crop_top_left"),
                          target], dim=1)

    def _batch_time_ids(self, batch: Dict[str, Any], n: int) -> torch.Tensor:
        """Size/crop ids of a batch: ``original_size`` / ``crop_top_left`` (B×2) where the data
        gives them, the batch's own height and width as the target."""
        if "image" in batch and isinstance(batch["image"], torch.Tensor):
            target = tuple(batch["image"].shape[-2:])
        elif "latent" in batch:
            target = tuple(int(d) * self.vae_factor for d in batch["latent"].shape[-2:])
        else:
            target = None
        return self.time_ids(n, batch.get("original_size"), batch.get("crop_top_left"), target)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1]."""
        with self._frozen():
            images = self.vae.decode((latents / self.latent_scale).to(self.vae_dtype)).sample
        return images.float().clamp(-1, 1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net as the diffusion process's model function."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        kwargs: Dict[str, Any] = {}
        if self.speed.get("channels_last"):
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if self.cfg.model.unet.use_pooled_text:
            kwargs["class_labels"] = cond["pooled"].to(x_t.dtype)
        if self.micro_conditioning:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(x_t.dtype),
                                           "time_ids": cond["time_ids"].to(x_t.dtype)}
        context = cond["context"].to(x_t.dtype)
        if self.image_embed_mode != "none":
            embedding = cond["image_embed"].to(x_t.dtype)
            if self.image_tokens is not None:
                context = torch.cat([context, self.image_tokens(embedding)], dim=1)
            if self.image_embed_mode in ("time", "both"):
                kwargs["timestep_cond"] = embedding
        return self.unet(x_t, t, encoder_hidden_states=context, **kwargs).sample

    # ------------------------------------------------------------------------------ training
    def _drop_mask(self, n: int) -> Optional[torch.Tensor]:
        """Rows whose caption is dropped (for classifier-free guidance); None without dropout."""
        p = self.cfg.model.caption_dropout
        if p <= 0:
            return None
        return torch.rand(n) < p

    def on_fit_start(self) -> None:
        if self.precomputed:
            self._check_precomputed()
        # Here, before any callback's on_train_start (the step-0 preview decodes with this scale)
        # and on every rank alike. A resumed run has it from its checkpoint, which strategies such
        # as FSDP2 restore only after this hook.
        trainer = self.trainer
        restored_later = trainer.ckpt_path is not None and trainer.strategy.restore_checkpoint_after_setup
        if float(self.latent_scale) == 0.0 and not restored_later:
            datamodule = trainer.datamodule
            state = datamodule.state_dict()
            self._estimate_latent_scale(datamodule.train_dataloader())
            datamodule.load_state_dict(state)  # the estimate's pass is not a training pass

    def _check_precomputed(self) -> None:
        """Load the precompute folder's empty-prompt states and check it fits this model."""
        folder = find_precompute_dir(self.cfg.data.train_shards)
        if folder is None:
            log.warning("no precompute.json beside the training shards; caption dropout uses the "
                        "text encoder's empty-prompt states and the shards are not checked")
            return
        self._empty_states = check_against(self, folder)

    @torch.no_grad()
    def _estimate_latent_scale(self, batches: Iterable[Dict[str, Any]]) -> None:
        """Set ``latent_scale`` to 1/std of the first N batches' latents (all ranks pooled, every
        rank getting the same value)."""
        n_batches = self.cfg.model.vae.scale_estimate_batches
        rows = [moments(self._raw_latents(batch, sample=True)) for batch in itertools.islice(batches, n_batches)]
        local = pool_moments(torch.stack(rows))
        # The collective needs device tensors: one float32 summary row per rank is accurate enough.
        count, _, m2 = pool_moments(self.all_gather(local.float().to(self.device))).tolist()
        scale = (count / m2) ** 0.5
        self.latent_scale.fill_(scale)
        log.info("latent scale estimated from %d batches: %.5f", n_batches, scale)

    def _loss(self, batch: Dict[str, Any], drop: Optional[torch.Tensor] = None, generator=None,
              sample: bool = True, image_drop: Optional[torch.Tensor] = None,
              size_drop: Optional[torch.Tensor] = None):
        latents = self.batch_latents(batch, sample=sample)
        cond = self.batch_condition(batch, drop, image_drop, size_drop)
        return self.diffusion.training_loss(
            lambda x_t, t: self.denoise(x_t, t, cond), latents, generator=generator
        )

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        bs = len(batch["caption"])
        p = float(self.cfg.model.micro_conditioning_dropout)
        size_drop = torch.rand(bs) < p if p > 0 else None  # no draw at 0: the RNG stream stays as it was
        out = self._loss(batch, self._drop_mask(bs),
                         image_drop=image_embed.drop_mask(bs, self.cfg.model.image_embed_dropout), size_drop=size_drop)
        self.log_losses("train", out, batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        # The loader pads ranks to equal length with valid=False placeholders; score real ones only.
        valid = batch.get("valid", torch.ones(len(batch["caption"]), dtype=torch.bool))
        if not bool(valid.any()):
            return
        keep = valid.nonzero().flatten().tolist()
        n = len(batch["caption"])
        batch = {k: (v[valid] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n
                     else [v[i] for i in keep] if isinstance(v, list) else v)
                 for k, v in batch.items()}
        # Fixed noise and timesteps per batch index, so validation losses are comparable over time.
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 100003 + batch_idx)
        out = self._loss(batch, None, generator=gen, sample=False)
        self.log_losses("val", out, batch_size=len(keep))

    # ------------------------------------------------------------------------------ sampling
    def sample(self, prompts: List[str], *, lora_scale: Optional[float] = None, **kwargs: Any) -> torch.Tensor:
        """Prompts → images B×3×H×W in [-1, 1] (:meth:`_sample` says which ``kwargs``).

        ``lora_scale`` multiplies the LoRA adapters' output (0: the base model's images exactly).
        """
        with self.lora_scaled(lora_scale):
            return self._sample(prompts, **kwargs)

    @torch.no_grad()
    def _sample(
        self, prompts: List[str], *, seed: int = 0, progress: bool = False,
        image_embeds: Optional[torch.Tensor] = None, init_image: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None, original_size: Optional[Any] = None,
        crop_top_left: Optional[Any] = None, target_size: Optional[Any] = None,
        width: Optional[int] = None, height: Optional[int] = None, **options: Any
    ) -> torch.Tensor:
        """Prompts → images B×3×``height``×``width`` in [-1, 1] (each side defaults to
        ``data.image_size`` and must be a multiple of :attr:`size_multiple`).

        ``options`` are :class:`SamplingOptions` fields (``sampler``, ``steps``, ``guidance_scale``,
        ``eta``, ``temperature``, ``strength``, ...); unset (or None) ones take the config's ``sampling:``.
        img2img: ``init_image`` (3×H×W, or 1 or B of them, in [-1, 1] at the sample's size) is
        encoded and noised to ``strength`` (< 1; ``int(steps·strength)`` steps run). Inpainting:
        ``mask`` (H×W, 1×H×W or 1|B×1×H×W; 1 = regenerate, 0 = keep) also needs ``init_image``; every
        latent cell touching a pixel to regenerate is generated, the others end as the init image's
        latents exactly (decoded, the VAE's reconstruction of it).
        ``image_embeds`` (B×E, scaled CLIP image embeddings) condition an unCLIP decoder; without
        them it samples from the text alone (a zero embedding, as image-embedding dropout trains).
        SDXL-style U-Nets (``model.pretrained`` of an SDXL pipeline) take ``original_size``,
        ``crop_top_left`` and ``target_size`` ((h, w) or B×2; see :meth:`time_ids`; the target
        defaults to the sample's size).
        """
        if not prompts:
            raise ValueError("sample() needs at least one prompt.")
        grid = self.latent_grid(width, height)
        sizes = {"original_size": original_size, "crop_top_left": crop_top_left, "target_size": target_size}
        if not self.micro_conditioning and any(v is not None for v in sizes.values()):
            raise ValueError("original_size, crop_top_left and target_size are SDXL micro-conditioning; "
                             "this model's U-Net takes no size/crop ids.")
        opts = SamplingOptions.from_mapping(self.cfg.sampling).replace(**options)
        cond = self.encode_prompts(prompts)
        uncond = None
        if opts.guidance_scale != 1.0:
            uncond = self.encode_prompts([""] * len(prompts))
            if self.zero_empty_prompt:  # as SDXL's pipeline with force_zeros_for_empty_prompt
                uncond = {k: torch.zeros_like(v) for k, v in uncond.items()}
        if self.micro_conditioning:
            if target_size is None:
                sizes["target_size"] = tuple(side * self.vae_factor for side in grid)
            cond["time_ids"] = self.time_ids(len(prompts), **sizes)
            if uncond is not None:
                uncond["time_ids"] = cond["time_ids"]
        if image_embeds is not None and self.image_embed_mode == "none":
            raise ValueError("this text_to_image model was not trained with image-embedding conditioning.")
        if self.image_embed_mode != "none":
            zeros = torch.zeros(len(prompts), self.clip.embed_dim, device=self.device)
            if image_embeds is not None and tuple(image_embeds.shape) != tuple(zeros.shape):
                raise ValueError(f"image_embeds must have shape {tuple(zeros.shape)}, got {tuple(image_embeds.shape)}.")
            cond["image_embed"] = zeros if image_embeds is None else image_embeds.to(self.device).float()
            if uncond is not None:
                uncond["image_embed"] = zeros
        start = self._init_latents(len(prompts), init_image, mask, grid) \
            if init_image is not None or mask is not None else {}
        latents = self.diffusion.sample(
            self.denoise,
            (len(prompts), self.latent_channels, *grid),
            cond=cond,
            uncond=uncond,
            options=opts,
            generator=torch.Generator(device=self.device).manual_seed(seed),
            device=self.device,
            progress=progress,
            **start,
        )
        return self.decode_latents(latents)

    def latent_grid(self, width: Optional[int] = None, height: Optional[int] = None) -> Tuple[int, int]:
        """The latent (h, w) of a ``width``×``height`` sample (None: ``data.image_size``); a side that is
        no multiple of :attr:`size_multiple` raises ``ValueError`` (one sentence)."""
        size = int(self.cfg.data.image_size)
        width, height = (size if v is None else int(v) for v in (width, height))
        problem = sample_size_problem(width, height, self.size_multiple)
        if problem:
            raise ValueError(f"cannot sample {width}x{height}: {problem}")
        return height // self.vae_factor, width // self.vae_factor

    def _init_latents(self, n: int, image: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                      grid: Tuple[int, int]) -> Dict[str, Any]:
        """``x_init`` (and ``mask``, 1 = known) latents for ``n`` samples of latent size ``grid``
        from pixel-space inputs."""
        height, width = (side * self.vae_factor for side in grid)
        if image is None:
            raise ValueError("inpainting with a mask needs init_image, the image whose unmasked part is kept.")
        image = image.unsqueeze(0) if image.ndim == 3 else image
        if image.ndim != 4 or image.shape[0] not in (1, n) or tuple(image.shape[1:]) != (3, height, width):
            raise ValueError(f"init_image must be 3x{height}x{width} (or 1 or {n} of them), got {tuple(image.shape)}.")
        latents = self.encode_images(image.to(self.device), sample=False)
        out: Dict[str, Any] = {"x_init": latents.expand(n, *latents.shape[1:]).contiguous()}
        if mask is not None:
            mask = mask.reshape(1, 1, *mask.shape) if mask.ndim == 2 else mask.unsqueeze(0) if mask.ndim == 3 else mask
            if mask.ndim != 4 or mask.shape[0] not in (1, n) or tuple(mask.shape[1:]) != (1, height, width):
                raise ValueError(f"mask must be {height}x{width} (or 1 or {n} of them), got {tuple(mask.shape)}.")
            regenerate = torch.nn.functional.adaptive_max_pool2d((mask > 0.5).float(), latents.shape[-2:])
            out["mask"] = (1.0 - regenerate).to(self.device)
        return out

    def preview_images(self) -> Dict[str, Any]:
        """Fixed prompts × 4 fixed seeds, one column per prompt, each image captioned with its
        prompt (for the image-logging callback): one grid ``samples`` at ``data.image_size``, or one
        ``samples_WxH`` per ``sampling.sizes`` entry."""
        prompts = list(self.cfg.sampling.prompts)
        if not prompts:
            return {}
        sizes = parse_sizes(self.cfg.sampling.sizes, "sampling.sizes")
        previews = {}
        for width, height in sizes or [(None, None)]:
            rows = [self.sample(prompts, seed=self.cfg.sampling.seed + r, width=width, height=height)
                    for r in range(4)]
            name = f"samples_{width}x{height}" if sizes else "samples"
            previews[name] = (torch.cat(rows), len(prompts), prompts * len(rows))
        return previews

