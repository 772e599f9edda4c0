"""open_clip text/image encoder for conditioning (text → image) and captioning (image → text).

:class:`ClipEncoder` wraps one open_clip model and gives the systems four things:

- ``tokenize(prompts)`` — open_clip's tokenizer for that model (the bundled BPE vocabulary for
  CLIP-style models, so it works offline), padded/truncated to the model's context length;
- ``encode_text(tokens) -> (states B×L×D, pooled B×E)`` — per-token states for cross-attention
  and the projected pooled text embedding (the usual CLIP text feature, unnormalised);
- ``encode_image(images) -> (pooled B×E, tokens B×N×W)`` — images in [-1, 1] of any size, resized
  to the tower's input size and CLIP-normalised inside;
- ``text_width``, ``embed_dim``, ``context_length``, ``image_token_width`` to size what consumes them.

``text_layer``: ``last`` takes the final transformer block's output; ``penultimate`` takes the
output of the second-to-last block. Both then go through the text tower's final LayerNorm
(``ln_final``), as Stable Diffusion 2 does with OpenCLIP ViT-H (``layer="penultimate"``). The
pooled embedding always comes from the full (last-layer) pass.

Frozen by default (``model.clip.freeze``): no parameter requires grad, the module stays in eval
mode even when a parent calls ``.train()``, and encoding runs under ``torch.no_grad()``. A system
that trains one tower only (text_to_image and prior train the text tower) calls
:meth:`ClipEncoder.train_only` with :meth:`ClipEncoder.text_parameters`: every other parameter is
frozen, and submodules left with no trainable parameter (the vision tower) stay in eval mode. It runs
in its own precision (``model.clip.precision``: open_clip's fp16/bf16 mode, LayerNorms in fp32);
inputs are cast to it and outputs are returned in float32.

``name: custom`` builds ``open_clip.model.CLIP`` directly from ``model.clip.arch`` — nothing is
registered in open_clip's global model table, so any number of different tiny configs coexist
in one process. Any other name goes through ``open_clip.create_model(name, pretrained=…)`` where
``pretrained`` is an open_clip tag (downloaded into the usual cache) or a local weights file.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, convert_weights_to_lp, get_cast_dtype
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from mmdiff.io.weights import load_state_dict_file, load_strict
from mmdiff.errors import CheckpointError, ConfigError
from mmdiff.models.dtypes import precision_dtype

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")
# Where a ClipEncoder's open_clip model sits in an mmdiff system's state dict (contrastive,
# captioning, text_to_image): such a .ckpt is accepted as `pretrained` for a custom CLIP.
_MMDIFF_CLIP_PREFIX = "clip.model."


@functools.lru_cache(maxsize=8)
def _simple_tokenizer(context_length: int) -> Any:
    return SimpleTokenizer(context_length=context_length)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.endswith(_WEIGHT_SUFFIXES)


def _custom_model_cfg(arch: Any) -> dict[str, Any]:
    v, t = arch.vision, arch.text
    return {
        "embed_dim": int(arch.embed_dim),
        "vision_cfg": {
            "image_size": int(v.image_size),
            "layers": int(v.layers),
            "width": int(v.width),
            "patch_size": int(v.patch_size),
            "head_width": int(v.head_width),
        },
        "text_cfg": {
            "context_length": int(t.context_length),
            "vocab_size": int(t.vocab_size),
            "width": int(t.width),
            "heads": int(t.heads),
            "layers": int(t.layers),
        },
    }


def _build_custom(cfg: DictConfig, precision: str) -> nn.Module:
    model = CLIP(**_custom_model_cfg(cfg.arch), cast_dtype=get_cast_dtype(precision))
    if cfg.pretrained is not None:
        path = Path(str(cfg.pretrained)).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"CLIP weights '{cfg.pretrained}' do not exist; set model.clip.pretrained to a local "
                "weights file for the custom architecture, or to null for random init."
            )
        state = load_state_dict_file(path)
        if any(k.startswith(_MMDIFF_CLIP_PREFIX) for k in state):  # an mmdiff system checkpoint
            n = len(_MMDIFF_CLIP_PREFIX)
            state = {k[n:]: v for k, v in state.items() if k.startswith(_MMDIFF_CLIP_PREFIX)}
        load_strict(model, state, f"CLIP ('{path}')", ignore_keys=list(cfg.get("ignore_keys") or []))
    if precision in ("fp16", "bf16"):
        convert_weights_to_lp(model, dtype=precision_dtype(precision))
    model.visual.image_mean = OPENAI_DATASET_MEAN
    model.visual.image_std = OPENAI_DATASET_STD
    return model


def _build_named(cfg: DictConfig, precision: str) -> tuple[nn.Module, Any]:
    name = str(cfg.name)
    pretrained = None if cfg.pretrained is None else str(cfg.pretrained)
    has_schema = name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and name.replace("/", "-") not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=1, cutoff=0.6)
        hint = f" — did you mean '{close[0]}'?" if close else " (see open_clip.list_models())"
        raise ConfigError(f"model.clip.name '{name}' is not an open_clip model or 'custom'{hint}")
    if pretrained is not None and _looks_like_path(pretrained):
        if not Path(pretrained).expanduser().is_file():
            raise CheckpointError(
                f"CLIP weights '{pretrained}' do not exist; set model.clip.pretrained to a local "
                "weights file or an open_clip pretrained tag."
            )
        pretrained = str(Path(pretrained).expanduser())
    try:
        model = open_clip.create_model(
            name, pretrained=pretrained, precision=precision, weights_only=True
        )
    except Exception as err:  # noqa: BLE001 - downloads, unknown tags, bad files: one sentence
        raise CheckpointError(
            f"could not load open_clip model '{name}' with pretrained='{pretrained}' "
            f"({_first_line(err)}); use a pretrained tag from open_clip.list_pretrained() with "
            "network access, or a local weights file."
        ) from None
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # noqa: BLE001 - HF tokenizers need the network the first time
        raise CheckpointError(
            f"could not load the tokenizer of open_clip model '{name}' ({_first_line(err)})."
        ) from None
    return model, tokenizer


def eval_frozen_children(module: nn.Module) -> None:
    """Put every submodule of ``module`` that holds parameters but no trainable one in eval mode."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            eval_frozen_children(child)


def train_only(module: nn.Module, params: Iterable[nn.Parameter]) -> bool:
    """Make ``params`` the only parameters of ``module`` that need a gradient; whether any does."""
    keep = {id(p) for p in params}
    for p in module.parameters():
        p.requires_grad_(id(p) in keep)
    return bool(keep)


class FrozenStaysEval:
    """Mixin for an ``nn.Module`` with a ``frozen`` flag: a frozen encoder, and the frozen parts of
    a partly trained one, stay in eval mode whatever ``train(mode)`` the parent asks for."""

    frozen: bool

    def train(self, mode: bool = True):  # noqa: D102 - nn.Module.train, see the class docstring
        super().train(mode and not self.frozen)
        if mode and not self.frozen:
            eval_frozen_children(self)
        return self


class ClipEncoder(FrozenStaysEval, nn.Module):
    """A (by default frozen) open_clip model with text/image encoding for conditioning."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        text_layer: str = "last",
        freeze: bool = True,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer  # open_clip's tokenizer for this model (ids via tokenize())
        self.text_layer = text_layer
        if self.text_layer not in ("last", "penultimate"):
            raise ConfigError(
                f"model.clip.text_layer must be 'last' or 'penultimate', got '{text_layer}'."
            )
        self.frozen = bool(freeze)
        self.compute_dtype = precision_dtype(precision)
        # Where the text transformer lives: on the CLIP itself, or CustomTextCLIP's `.text`.
        self._text_on_model = isinstance(model, CLIP)
        text_tower = getattr(model, "text", None)
        if not self._text_on_model and not isinstance(text_tower, TextTransformer):
            raise ConfigError(
                f"open_clip model {type(model).__name__} has a text tower ClipEncoder cannot read "
                "per-token states from; choose a model with an open_clip text transformer."
            )
        if self.text_layer == "penultimate" and len(self._text.transformer.resblocks) < 2:
            raise ConfigError(
                "model.clip.text_layer 'penultimate' needs a text tower with >= 2 layers."
            )
        visual = model.visual
        if hasattr(visual, "output_tokens"):
            visual.output_tokens = True  # forward returns (pooled, tokens)
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ClipEncoder":
        """Build from a ``model.clip`` config section (see the module docstring)."""
        precision = cfg.precision
        if str(cfg.name) == "custom":
            model = _build_custom(cfg, precision)
            tokenizer = _simple_tokenizer(int(cfg.arch.text.context_length))
        else:
            model, tokenizer = _build_named(cfg, precision)
        return cls(model, tokenizer, cfg.text_layer, freeze=cfg.freeze, precision=precision)

    # ----------------------------------------------------------------------- what trains
    def named_text_parameters(self, pooled: bool = True) -> List[Tuple[str, nn.Parameter]]:
        """The text tower's ``(name in self.model, parameter)``: token and positional embeddings,
        the transformer, ``ln_final`` and ``text_projection`` (never the vision tower nor
        ``logit_scale``).

        ``pooled=False``: only those the per-token states depend on — no ``text_projection`` and,
        with ``text_layer: penultimate``, not the last block — for a system that never uses the
        pooled embedding (DDP refuses trainable parameters that get no gradient).
        """
        prefix = "" if self._text_on_model else "text."
        tower = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
        unused = []
        if not pooled:
            unused.append("text_projection")
            if self.text_layer == "penultimate":
                unused.append(f"transformer.resblocks.{len(self._text.transformer.resblocks) - 1}.")
        out = []
        for name, p in self.model.named_parameters():
            if not name.startswith(prefix):
                continue
            local = name[len(prefix):]
            in_tower = not self._text_on_model or local.startswith(tower)
            if in_tower and not local.startswith(tuple(unused)):
                out.append((name, p))
        return out

    def text_parameters(self, pooled: bool = True) -> List[nn.Parameter]:
        """The parameters of :meth:`named_text_parameters` (what a trained text encoder trains)."""
        return [p for _, p in self.named_text_parameters(pooled)]

    def image_parameters(self) -> List[nn.Parameter]:
        """The vision tower's parameters (what a captioning system fine-tunes)."""
        return list(self.model.visual.parameters())

    def image_state_dict(self) -> Dict[str, torch.Tensor]:
        """The vision tower's weights (what fixes the CLIP image-embedding space)."""
        return self.model.visual.state_dict()

    def train_only(self, params: Iterable[nn.Parameter]) -> None:
        """Train exactly ``params`` (of this encoder): every other parameter needs no gradient, and
        submodules left without a trainable parameter stay in eval mode (see :meth:`train`)."""
        self.frozen = not train_only(self, params)
        self.train(self.training)

    # ----------------------------------------------------------------------------- properties
    @property
    def _text(self) -> nn.Module:
        return self.model if self._text_on_model else self.model.text

    @property
    def context_length(self) -> int:
        return int(self._text.context_length)

    @property
    def text_width(self) -> int:
        return int(self._text.transformer.width)

    @property
    def embed_dim(self) -> int:
        proj = self._text.text_projection
        if proj is None:
            return self.text_width
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        return int(proj.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.model.visual, "image_size", 224)
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def image_token_width(self) -> int:
        """Width of the per-patch image tokens (the vision transformer's width, unprojected)."""
        ln_post = getattr(self.model.visual, "ln_post", None)
        if not isinstance(ln_post, nn.LayerNorm):
            raise ConfigError(
                f"open_clip vision tower {type(self.model.visual).__name__} gives no per-patch "
                "tokens; choose a ViT-based model for image tokens."
            )
        return int(ln_post.normalized_shape[0])

    @property
    def device(self) -> torch.device:
        return self._mean.device

    # ------------------------------------------------------------------------------- encoding
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids B×context_length (LongTensor on CPU) for a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.tokenizer(list(prompts), context_length=self.context_length).long()

    def prompts_cut_off(self, prompts: Sequence[str]) -> List[int]:
        """Indices of the prompts longer than the context, which :meth:`tokenize` cuts off.

        open_clip truncates silently (the end-of-text token overwrites the last position), so a
        prompt is cut exactly when its tokens differ from those of a one-token-longer context.
        """
        fitted = self.tokenize(prompts)
        longer = self.tokenizer(list(prompts), context_length=self.context_length + 1).long()
        return torch.nonzero((fitted != longer[:, : self.context_length]).any(dim=1)).flatten().tolist()

    def _grad_context(self) -> Any:
        """No autograd when frozen; otherwise the caller's grad mode (a ``no_grad`` caller wins)."""
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states B×L×text_width, pooled B×embed_dim)`` in float32 for token ids B×L."""
        tokens = tokens.to(self.device)
        with self._grad_context():
            out = self.model.forward_intermediates(
                text=tokens,
                text_indices=2 if len(self._text.transformer.resblocks) >= 2 else 1,
                normalize=False,
                normalize_intermediates=True,  # ln_final on the taken block outputs
            )
            inter = out["text_intermediates"]
            states = inter[-1] if self.text_layer == "last" else inter[-2]
            pooled = out["text_features"]
        return states.float(), pooled.float()

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size → the tower's size, CLIP mean/std, compute dtype."""
        x = images.to(device=self.device, dtype=torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(
                x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True
            )
        x = ((x + 1.0) * 0.5).clamp(0.0, 1.0)
        x = (x - self._mean) / self._std
        return x.to(self.compute_dtype)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled B×embed_dim, tokens B×N×image_token_width)`` in float32."""
        self.image_token_width  # fails early for towers without per-patch tokens
        x = self.preprocess_images(images)
        with self._grad_context():
            out = self.model.visual(x)
        if not isinstance(out, tuple):
            raise ConfigError("the open_clip vision tower returned no per-patch tokens.")
        pooled, tokens = out
        return pooled.float(), tokens.float()

    def extra_repr(self) -> str:
        return f"text_layer={self.text_layer}, frozen={self.frozen}, dtype={self.compute_dtype}"


__all__ = ["ClipEncoder", "FrozenStaysEval", "eval_frozen_children", "train_only"]
