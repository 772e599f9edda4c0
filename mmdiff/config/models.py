"""The network sections shared by the systems: ``model.vae``, ``model.clip``, ``model.unet``."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from mmdiff.config.fields import choice, divides, require


class TextLayer(str, enum.Enum):
    last = "last"
    penultimate = "penultimate"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ReconLoss(str, enum.Enum):
    l1 = "l1"
    l2 = "l2"


class UNetCompile(str, enum.Enum):
    none = "none"  # ("off" would read as a YAML boolean)
    full = "full"  # torch.compile of the whole U-Net
    regional = "regional"  # torch.compile of each down/mid/up block (much shorter compile times)


@dataclass
class VAEConfig:
    """diffusers ``AutoencoderKL``: built from these fields, or loaded from ``pretrained``."""

    # A local diffusers folder, a .safetensors file, or an mmdiff autoencoder .ckpt; None = build.
    pretrained: Optional[str] = None
    in_channels: int = 3
    # Weight names (or fnmatch patterns) that may be missing from / extra in the pretrained file;
    # every other key must match (loading is always strict).
    ignore_keys: List[str] = field(default_factory=list)
    latent_channels: int = 4
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 32
    # None: estimate 1/std from the first `scale_estimate_batches` training batches.
    scaling_factor: Optional[float] = None
    scale_estimate_batches: int = 4
    precision: str = choice(Precision.fp32)
    recon_loss: str = choice(ReconLoss.l1)
    kl_weight: float = 1e-6
    use_discriminator: bool = False
    disc_start_step: int = 2000
    disc_weight: float = 0.5
    # PatchGAN discriminator size: base channels and number of stride-2 layers.
    disc_channels: int = 64
    disc_layers: int = 3

    @staticmethod
    def check(v: DictConfig, cfg: DictConfig) -> None:
        ch = list(v.block_out_channels)
        require(len(ch) > 0, "model.vae.block_out_channels must list at least one width.")
        if v.pretrained is None:
            require(
                divides(v.norm_num_groups, ch),
                f"model.vae.block_out_channels {ch} must all be divisible by model.vae.norm_num_groups "
                f"{v.norm_num_groups}.",
            )
        require(v.in_channels > 0, "model.vae.in_channels must be positive.")
        require(v.latent_channels > 0, "model.vae.latent_channels must be positive.")
        require(v.layers_per_block > 0, "model.vae.layers_per_block must be positive.")
        require(v.kl_weight >= 0, f"model.vae.kl_weight must be >= 0, got {v.kl_weight}.")
        require(
            v.scaling_factor is None or v.scaling_factor > 0,
            f"model.vae.scaling_factor must be positive or null, got {v.scaling_factor}.",
        )
        require(v.scale_estimate_batches > 0, "model.vae.scale_estimate_batches must be positive.")
        require(v.disc_start_step >= 0, "model.vae.disc_start_step must be >= 0.")
        require(v.disc_weight >= 0, "model.vae.disc_weight must be >= 0.")
        require(v.disc_channels > 0, "model.vae.disc_channels must be positive.")
        require(v.disc_layers > 0, "model.vae.disc_layers must be positive.")
        require(
            cfg.system != "autoencoder" or v.precision == Precision.fp32,
            f"model.vae.precision={v.precision} is the frozen VAE's precision in other systems; the "
            "autoencoder system trains the VAE in float32 (use trainer.precision=bf16-mixed for speed).",
        )

    @staticmethod
    def check_latent_size(v: DictConfig, cfg: DictConfig) -> None:
        """data.image_size (and data.buckets.step) must be multiples of the VAE's down-sampling factor (built VAEs)."""
        factor = 2 ** (len(v.block_out_channels) - 1)
        require(
            v.pretrained is not None or cfg.data.image_size % factor == 0,
            f"data.image_size {cfg.data.image_size} is not divisible by the VAE's down-sampling factor {factor}.",
        )
        require(
            v.pretrained is not None or not cfg.data.buckets.enabled or cfg.data.buckets.step % factor == 0,
            f"data.buckets.step {cfg.data.buckets.step} is not divisible by the VAE's down-sampling factor "
            f"{factor}, so bucket sides would not fit the latent grid.",
        )


@dataclass
class ClipVisionConfig:
    image_size: int = 32
    layers: int = 2
    width: int = 64
    patch_size: int = 8
    head_width: int = 32


@dataclass
class ClipTextConfig:
    context_length: int = 32
    vocab_size: int = 49408
    width: int = 64
    heads: int = 2
    layers: int = 2


@dataclass
class ClipArchConfig:
    """A custom open_clip architecture (tiny ones for tests and the demo)."""

    embed_dim: int = 64
    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)


# The systems where model.clip.freeze=false trains the text tower beside the denoiser (its own
# optimiser group, optim.text_encoder_lr). contrastive trains the whole CLIP whatever freeze says;
# captioning with freeze=false trains the CLIP's vision tower.
TEXT_ENCODER_SYSTEMS = ("text_to_image", "prior")
# Systems that build no CLIP at all.
NO_CLIP_SYSTEMS = ("autoencoder",)


@dataclass
class ClipConfig:
    """open_clip text/image encoder."""

    # An open_clip model name (e.g. ViT-H-14), or "custom" to build from `arch`.
    name: str = "custom"
    # An open_clip pretrained tag, a local checkpoint file, or None for random init.
    pretrained: Optional[str] = None
    arch: ClipArchConfig = field(default_factory=ClipArchConfig)
    # Weight names (or fnmatch patterns) that may be missing from / extra in the pretrained file;
    # every other key must match (loading is always strict).
    ignore_keys: List[str] = field(default_factory=list)
    text_layer: str = choice(TextLayer.last)
    freeze: bool = True
    precision: str = choice(Precision.fp32)

    @staticmethod
    def check_training(c: DictConfig, cfg: DictConfig) -> None:
        """What ``freeze`` may be combined with: a trained CLIP tower, its LR, precision and strategy."""
        system = str(cfg.system)
        trains_text = not c.freeze and system in TEXT_ENCODER_SYSTEMS
        trains_clip = system == "contrastive" or (not c.freeze and system not in NO_CLIP_SYSTEMS)
        lora = cfg.model.get("lora")
        adapts_text = lora is not None and lora.rank > 0 and bool(lora.text_encoder)  # LoRA on the text tower
        require(
            c.freeze or system not in NO_CLIP_SYSTEMS,
            f"model.clip.freeze=false has no effect in the {system} system, which has no CLIP; remove it.",
        )
        require(
            cfg.optim.text_encoder_lr is None or trains_text or adapts_text,
            "optim.text_encoder_lr is set but no text encoder is trained; it needs model.clip.freeze=false "
            f"in a {' or '.join(TEXT_ENCODER_SYSTEMS)} system, or model.lora.text_encoder=true (remove it, "
            "or train the text encoder).",
        )
        require(
            not ((trains_text or adapts_text) and cfg.model.precomputed),
            "model.clip.freeze=false or model.lora.text_encoder trains the text encoder, but model.precomputed reads fixed text states "
            "from the shards; train from images and captions, or keep model.clip.freeze=true.",
        )
        require(
            not trains_clip or c.precision == Precision.fp32,
            f"model.clip.precision={c.precision} would store the trained CLIP's weights in {c.precision} "
            "(no float32 master weights); use model.clip.precision=fp32 with trainer.precision=bf16-mixed.",
        )
        require(
            not (trains_text and str(cfg.trainer.strategy) == "fsdp"),
            "trainer.strategy=fsdp shards the denoiser only and cannot train the text encoder "
            "(model.clip.freeze=false); use trainer.strategy=ddp.",
        )

    @staticmethod
    def check(c: DictConfig, cfg: DictConfig) -> None:
        if c.name != "custom" or cfg.model.get("pretrained") is not None:  # model.pretrained: the pipeline's encoders
            return
        a, vis, txt = c.arch, c.arch.vision, c.arch.text
        require(a.embed_dim > 0, "model.clip.arch.embed_dim must be positive.")
        require(
            txt.heads > 0 and txt.width % txt.heads == 0,
            f"model.clip.arch.text.width {txt.width} must be divisible by text.heads {txt.heads}.",
        )
        require(
            vis.head_width > 0 and vis.width % vis.head_width == 0,
            f"model.clip.arch.vision.width {vis.width} must be divisible by vision.head_width "
            f"{vis.head_width}.",
        )
        require(
            vis.patch_size > 0 and vis.image_size % vis.patch_size == 0,
            f"model.clip.arch.vision.image_size {vis.image_size} must be divisible by "
            f"vision.patch_size {vis.patch_size}.",
        )
        require(txt.context_length > 0, "model.clip.arch.text.context_length must be positive.")
        require(vis.layers > 0 and txt.layers > 0, "model.clip.arch layers must be positive.")
        require(
            c.text_layer != TextLayer.penultimate or txt.layers >= 2,
            "model.clip.text_layer 'penultimate' needs model.clip.arch.text.layers >= 2.",
        )


@dataclass
class UNetConfig:
    """diffusers ``UNet2DConditionModel``; in/out channels follow the VAE latent channels."""

    pretrained: Optional[str] = None
    block_out_channels: List[int] = field(default_factory=lambda: [64, 128])
    # Weight names (or fnmatch patterns) that may be missing from / extra in the pretrained file;
    # every other key must match (loading is always strict).
    ignore_keys: List[str] = field(default_factory=list)
    down_block_types: List[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D", "DownBlock2D"]
    )
    up_block_types: List[str] = field(default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D"])
    layers_per_block: int = 1
    # Channels per attention head (a block of C channels gets C / attention_head_dim heads);
    # unlike diffusers' config key of the same name, which is the number of heads.
    attention_head_dim: int = 8
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    # None: the text encoder's width.
    cross_attention_dim: Optional[int] = None
    use_pooled_text: bool = False
    # Linear (not 1×1-conv) projections in and out of each transformer, as Stable Diffusion 2.x
    # has: needed to load SD-2 weights, and a few per cent faster (docs/performance.md). False by
    # default so checkpoints written before this key existed still load.
    use_linear_projection: bool = False
    # Speed switches (docs/performance.md). channels_last: null = on when training on a GPU.
    channels_last: Optional[bool] = None
    compile: str = choice(UNetCompile.none)
    # Recompute activations in the backward pass: less memory, ~30% more compute.
    gradient_checkpointing: bool = False

    @staticmethod
    def check(u: DictConfig, cfg: DictConfig) -> None:
        if u.pretrained is not None or cfg.model.get("pretrained") is not None:  # a loaded U-Net keeps its config
            return
        uch = list(u.block_out_channels)
        require(
            len(u.down_block_types) == len(uch) == len(u.up_block_types),
            f"model.unet.down_block_types, up_block_types and block_out_channels must have the "
            f"same length, got {len(u.down_block_types)}, {len(u.up_block_types)} and {len(uch)}.",
        )
        require(
            divides(u.attention_head_dim, uch),
            f"model.unet.block_out_channels {uch} must all be divisible by "
            f"model.unet.attention_head_dim {u.attention_head_dim}.",
        )
        require(
            divides(u.norm_num_groups, uch),
            f"model.unet.block_out_channels {uch} must all be divisible by "
            f"model.unet.norm_num_groups {u.norm_num_groups}.",
        )
        require(u.layers_per_block > 0, "model.unet.layers_per_block must be positive.")
        require(
            u.transformer_layers_per_block > 0,
            "model.unet.transformer_layers_per_block must be positive.",
        )
        require(
            u.cross_attention_dim is None or u.cross_attention_dim > 0,
            "model.unet.cross_attention_dim must be positive or null.",
        )
