"""A Stable Diffusion pipeline's text encoder(s) as open_clip towers, with ClipEncoder's text interface.

:class:`PipelineTextEncoder` holds one tower (SD 1.x, SD 2.x) or two (SDXL) converted exactly from
transformers (:mod:`mmdiff.models.hf_text`) and gives a text-to-image system what
:class:`~mmdiff.models.clip.ClipEncoder` gives it:

- ``tokenize(prompts) -> B×n_towers×L`` ids, each tower with its pipeline tokenizer's padding
  (transformers' ``CLIPTokenizer`` over the bundled BPE, so ids equal the pipeline's);
- ``encode_text(tokens) -> (states B×L×sum(widths), pooled B×embed_dim)`` in float32: each tower's
  states as its spec says (``hidden_layer``, ``final_layer_norm``), concatenated on the feature
  axis as SDXL does, and the pooled output of the last tower (``text_embeds`` with a projection,
  else ``pooler_output``);
- ``text_width``, ``embed_dim``, ``context_length``, ``device``, ``prompts_cut_off``, ``frozen``;
- ``named_text_parameters(pooled)``, ``text_parameters(pooled)``, ``train_only(params)``: what a
  trained text encoder trains (``model.clip.freeze: false``, :mod:`mmdiff.systems.text_training`).

Frozen by default: no grad, eval mode kept through a parent's ``.train()``. It computes in its
own precision (fp16/bf16 weights, LayerNorms in fp32, as open_clip) and returns float32.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, List, Mapping, Sequence, Tuple

import torch
from open_clip.model import convert_weights_to_lp
from open_clip.transformer import TextTransformer
from torch import nn

from mmdiff.errors import CheckpointError
from mmdiff.models.clip import FrozenStaysEval, train_only
from mmdiff.models.clip_tokenizer import clip_tokenizer
from mmdiff.models.dtypes import precision_dtype
from mmdiff.models.hf_text import (
    TextEncoderSpec,
    encode_tower,
    text_transformer_from_config,
    text_transformer_from_hf,
)

log = logging.getLogger(__name__)

SpecLike = TextEncoderSpec | Mapping[str, Any]


class PipelineTextEncoder(FrozenStaysEval, nn.Module):
    """One or two open_clip text towers read the way a diffusers pipeline reads its encoders."""

    def __init__(
        self,
        towers: Sequence[TextTransformer],
        specs: Sequence[SpecLike],
        freeze: bool = True,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        specs = [TextEncoderSpec.from_dict(s) for s in specs]
        if not towers or len(towers) != len(specs):
            raise CheckpointError(
                f"a pipeline text encoder needs one spec per tower; got {len(towers)} towers and {len(specs)} specs."
            )
        lengths = {s.context_length for s in specs}
        if len(lengths) != 1:
            raise CheckpointError(
                f"the text encoders' tokenizers have different context lengths {sorted(lengths)}; "
                "one token tensor needs one length."
            )
        for tower, spec in zip(towers, specs):
            if spec.context_length > tower.positional_embedding.shape[0]:
                raise CheckpointError(
                    f"context_length {spec.context_length} exceeds the tower's "
                    f"{tower.positional_embedding.shape[0]} positions."
                )
        self.towers = nn.ModuleList(towers)
        self._specs = specs
        self.frozen = bool(freeze)
        self.precision = precision
        self.compute_dtype = precision_dtype(precision)
        if precision in ("fp16", "bf16"):
            for tower in self.towers:
                convert_weights_to_lp(tower, dtype=self.compute_dtype)
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_hf(
        cls,
        models: Sequence[nn.Module],
        specs: Sequence[SpecLike],
        freeze: bool = True,
        precision: str = "fp32",
    ) -> "PipelineTextEncoder":
        """Convert transformers CLIP text models (in pipeline order) with their specs."""
        towers = [text_transformer_from_hf(m) for m in models]
        return cls(towers, specs, freeze=freeze, precision=precision)

    @classmethod
    def from_specs(
        cls, specs: Sequence[SpecLike], freeze: bool = True, precision: str = "fp32"
    ) -> "PipelineTextEncoder":
        """The architecture only (random init), e.g. to load a checkpoint's state dict into."""
        specs = [TextEncoderSpec.from_dict(s) for s in specs]
        towers = [text_transformer_from_config(s.hf_config, with_projection=s.with_projection) for s in specs]
        return cls(towers, specs, freeze=freeze, precision=precision)

    # ----------------------------------------------------------------------- what trains
    def named_text_parameters(self, pooled: bool = True) -> List[Tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of what the outputs depend on: each tower's embeddings and blocks up
        to its ``hidden_layer`` (and ``ln_final`` when its states pass through it); with ``pooled``,
        also the last tower's later blocks, ``ln_final`` and projection. A parameter outside this
        list gets no gradient, which DDP refuses in a trained one."""
        out = []
        last = len(self.towers) - 1
        for index, (tower, spec) in enumerate(zip(self.towers, self._specs)):
            take = len(tower.transformer.resblocks) + int(spec.hidden_layer)
            full = pooled and index == last
            for name, p in tower.named_parameters():
                if name.startswith("transformer.resblocks."):
                    used = full or int(name.split(".")[2]) <= take
                elif name.startswith("ln_final."):
                    used = full or spec.final_layer_norm
                elif name.startswith("text_projection"):
                    used = full
                else:
                    used = True
                if used:
                    out.append((f"towers.{index}.{name}", p))
        return out

    def text_parameters(self, pooled: bool = True) -> List[nn.Parameter]:
        """The parameters of :meth:`named_text_parameters`."""
        return [p for _, p in self.named_text_parameters(pooled)]

    def train_only(self, params: Iterable[nn.Parameter]) -> None:
        """Train exactly ``params``; submodules left without a trainable parameter stay in eval mode."""
        self.frozen = not train_only(self, params)
        self.train(self.training)

    # ----------------------------------------------------------------------------- properties
    @property
    def specs(self) -> List[dict[str, Any]]:
        """The towers' specs as plain dicts (hyper-parameters; :meth:`from_specs` reads them)."""
        return [s.to_dict() for s in self._specs]

    @property
    def context_length(self) -> int:
        return int(self._specs[0].context_length)

    @property
    def text_width(self) -> int:
        """Width of the per-token states: the towers' widths summed."""
        return sum(int(t.width) for t in self.towers)

    @property
    def embed_dim(self) -> int:
        """Width of the pooled output: the last tower's projection, else its width."""
        tower = self.towers[-1]
        proj = tower.text_projection
        if proj is None:
            return int(tower.width)
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def device(self) -> torch.device:
        return self.towers[0].positional_embedding.device

    # ------------------------------------------------------------------------------- encoding
    def _tokenizers(self) -> list[Any]:
        return [clip_tokenizer(s.pad_token, s.context_length) for s in self._specs]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids B×n_towers×context_length (LongTensor on CPU), as the pipeline's tokenizers give."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [
            tok(list(prompts), padding="max_length", max_length=self.context_length, truncation=True,
                return_tensors="pt").input_ids
            for tok in self._tokenizers()
        ]
        return torch.stack(ids, dim=1).long()

    def prompts_cut_off(self, prompts: Sequence[str]) -> List[int]:
        """Indices of the prompts longer than the context, which :meth:`tokenize` cuts off."""
        if isinstance(prompts, str):
            prompts = [prompts]
        cut = set()
        for tok in self._tokenizers():
            # verbose=False: transformers would otherwise warn about each overlong prompt.
            for index, ids in enumerate(tok(list(prompts), truncation=False, verbose=False).input_ids):
                if len(ids) > self.context_length:
                    cut.add(index)
        return sorted(cut)

    def _grad_context(self) -> Any:
        """No autograd when frozen; otherwise the caller's grad mode (a ``no_grad`` caller wins)."""
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states B×L×text_width, pooled B×embed_dim)`` in float32 for ids B×n_towers×L.

        Ids B×L are accepted for a single tower.
        """
        if tokens.dim() == 2 and len(self.towers) == 1:
            tokens = tokens.unsqueeze(1)
        if tokens.dim() != 3 or tokens.shape[1] != len(self.towers):
            raise CheckpointError(
                f"token ids of shape {tuple(tokens.shape)} do not fit {len(self.towers)} text "
                "encoder(s); pass what tokenize() returns (B×n_towers×L)."
            )
        tokens = tokens.to(self.device)
        states, pooled = [], None
        with self._grad_context():
            for index, (tower, spec) in enumerate(zip(self.towers, self._specs)):
                s, pooled = encode_tower(tower, tokens[:, index], hidden_layer=spec.hidden_layer,
                                         final_layer_norm=spec.final_layer_norm)
                states.append(s.float())
        return torch.cat(states, dim=-1), pooled.float()

    def extra_repr(self) -> str:
        layers = [(s.hidden_layer, s.final_layer_norm) for s in self._specs]
        return f"towers={len(self.towers)}, layers={layers}, frozen={self.frozen}, dtype={self.compute_dtype}"


__all__ = ["PipelineTextEncoder"]
