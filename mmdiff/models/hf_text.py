"""transformers CLIP text encoders <-> open_clip ``TextTransformer``, weight for weight.

Stable Diffusion pipelines hold transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``;
mmdiff keeps text towers as open_clip modules. Both run the same pre-LayerNorm causal transformer,
so a conversion is a copy: q/k/v projections fused into ``in_proj_weight`` (q, k, v order),
``fc1``/``fc2`` → ``c_fc``/``c_proj``, the activation (``quick_gelu`` → ``QuickGELU``, ``gelu`` →
exact ``nn.GELU``), the positional table, ``final_layer_norm`` → ``ln_final`` and the projection
``Linear`` → the matrix ``W`` of ``pooled @ W``. Pooling matches transformers exactly: configs with
the legacy ``eos_token_id == 2`` pool at ``argmax(ids)``, others at the first ``eos_token_id``.

:class:`TextEncoderSpec` says which states a pipeline feeds its U-Net (``hidden_layer``,
``final_layer_norm``) and how its tokenizer pads; with ``hf_config`` it rebuilds the architecture
from a checkpoint's hyper-parameters (:func:`text_transformer_from_config`).

:func:`encode_tower` is the one forward pass used for every tower: per-token states of the chosen
block (optionally through ``ln_final``) and the pooled output of the full pass, in one run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from open_clip.model import CLIP
from open_clip.transformer import LayerNormFp32, QuickGELU, ResidualAttentionBlock, TextTransformer
from torch import nn

from mmdiff.errors import CheckpointError
from mmdiff.models.clip_tokenizer import EOS_TOKEN

_ACTIVATIONS = ("quick_gelu", "gelu")
# transformers' CLIP text model pools at argmax(ids) when a config still has this legacy id.
_LEGACY_EOS_ID = 2
_EOS_ID = 49407
_BOS_ID = 49406
# Config keys that describe a saved file or generic head/output options rather than the text
# architecture; not kept in a spec (transformers' defaults refill them).
_VOLATILE_KEYS = (
    "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "id2label",
    "label2id", "problem_type", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "_attn_implementation_autoset",
)


@dataclass
class TextEncoderSpec:
    """What one pipeline text encoder is and how the pipeline reads it (plain, JSON-able).

    ``hidden_layer``: which block's output becomes the per-token states (-1 last, -2 penultimate,
    as ``hidden_states[hidden_layer]`` in transformers); ``final_layer_norm``: whether those states
    go through the final LayerNorm (``last_hidden_state`` is ``hidden_layer=-1`` with it; SDXL reads
    ``hidden_states[-2]`` without). ``pad_token`` is the tokenizer's padding token
    (``<|endoftext|>`` or ``!``), ``context_length`` its ``model_max_length``.
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    with_projection: bool = False
    hidden_layer: int = -1
    final_layer_norm: bool = True
    pad_token: str = EOS_TOKEN
    context_length: int = 77

    @classmethod
    def from_hf(
        cls,
        model: nn.Module,
        *,
        hidden_layer: int = -1,
        final_layer_norm: bool = True,
        pad_token: str = EOS_TOKEN,
        context_length: int | None = None,
    ) -> "TextEncoderSpec":
        """The spec of a transformers CLIP text model (``context_length`` defaults to its positions)."""
        config = hf_config_dict(model.config)
        spec = cls(
            hf_config=config,
            with_projection=_has_projection(model),
            hidden_layer=int(hidden_layer),
            final_layer_norm=bool(final_layer_norm),
            pad_token=str(pad_token),
            context_length=int(context_length or config["max_position_embeddings"]),
        )
        spec.check()
        return spec

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "TextEncoderSpec") -> "TextEncoderSpec":
        """A spec from :meth:`to_dict`'s output (e.g. a checkpoint's hyper-parameters)."""
        if isinstance(data, TextEncoderSpec):
            return data
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(
                f"text encoder spec has unknown keys {unknown}; expected only {sorted(names)}."
            )
        spec = cls(**{k: (dict(v) if k == "hf_config" else v) for k, v in data.items()})
        spec.check()
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain containers (``dataclasses.asdict``), for hyper-parameters and JSON."""
        return dataclasses.asdict(self)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.get("num_hidden_layers", 12))

    def check(self) -> None:
        """One-sentence errors for values no tower can honour."""
        layers = self.num_layers
        if not -layers <= int(self.hidden_layer) <= -1:
            raise CheckpointError(
                f"text encoder hidden_layer {self.hidden_layer} is outside -{layers}..-1 for a "
                f"{layers}-layer text model; use -1 (last) or -2 (penultimate)."
            )
        positions = int(self.hf_config.get("max_position_embeddings", 77))
        if not 2 <= int(self.context_length) <= positions:
            raise CheckpointError(
                f"text encoder context_length {self.context_length} must be between 2 and the "
                f"model's max_position_embeddings ({positions})."
            )
        act = self.hf_config.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS:
            raise CheckpointError(
                f"text encoder hidden_act '{act}' is not supported; open_clip towers run one of {_ACTIVATIONS}."
            )


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` as a JSON-able dict of its architecture fields."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in _VOLATILE_KEYS}
    return json.loads(json.dumps(data, default=str))  # plain containers only (checkpoint hparams)


def _has_projection(model: nn.Module) -> bool:
    return isinstance(getattr(model, "text_projection", None), nn.Linear)


def _core(model: nn.Module) -> nn.Module:
    """The module holding embeddings/encoder/final_layer_norm (``text_model`` in some versions)."""
    return getattr(model, "text_model", model)


# ------------------------------------------------------------------------------- hf -> open_clip
def text_transformer_from_config(hf_config: Mapping[str, Any], *, with_projection: bool) -> TextTransformer:
    """A random-init open_clip ``TextTransformer`` with the architecture of a ``CLIPTextConfig`` dict."""
    cfg = dict(hf_config)
    width = int(cfg.get("hidden_size", 512))
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"text encoder hidden_act '{act}' is not supported; open_clip towers run one of {_ACTIVATIONS}."
        )
    eos_id = int(cfg.get("eos_token_id", _EOS_ID) if not isinstance(cfg.get("eos_token_id"), list)
                 else cfg["eos_token_id"][0])
    projection_dim = int(cfg.get("projection_dim") or width)
    return TextTransformer(
        context_length=int(cfg.get("max_position_embeddings", 77)),
        vocab_size=int(cfg.get("vocab_size", 49408)),
        width=width,
        heads=int(cfg.get("num_attention_heads", 8)),
        layers=int(cfg.get("num_hidden_layers", 12)),
        mlp_ratio=int(cfg.get("intermediate_size", 4 * width)) / width,
        output_dim=projection_dim if with_projection else None,
        pool_type="argmax" if eos_id == _LEGACY_EOS_ID else "eos",
        eos_id=eos_id,
        proj_type="linear" if with_projection else "none",
        proj_bias=False,
        act_layer=QuickGELU if act == "quick_gelu" else nn.GELU,
        # fp32 LayerNorms whatever the compute precision, as open_clip's low-precision models.
        norm_layer=functools.partial(LayerNormFp32, eps=float(cfg.get("layer_norm_eps") or 1e-5)),
    )


@torch.no_grad()
def text_transformer_from_hf(model: nn.Module) -> TextTransformer:
    """An open_clip ``TextTransformer`` whose outputs equal a transformers CLIP text model's.

    ``model`` is a ``CLIPTextModel`` or ``CLIPTextModelWithProjection`` (then ``text_projection``
    is kept, so the pooled output is ``text_embeds``; otherwise it is ``pooler_output``).
    """
    config = hf_config_dict(model.config)
    with_projection = _has_projection(model)
    tower = text_transformer_from_config(config, with_projection=with_projection)
    core = _core(model)
    tower.token_embedding.weight.copy_(core.embeddings.token_embedding.weight)
    tower.positional_embedding.copy_(core.embeddings.position_embedding.weight)
    for block, layer in zip(tower.transformer.resblocks, core.encoder.layers):
        attn = layer.self_attn
        block.attn.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        block.attn.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        _copy_block(block, layer, into_open_clip=True)
    _copy_affine(tower.ln_final, core.final_layer_norm)
    if with_projection:
        tower.text_projection.copy_(model.text_projection.weight.t())
    return tower


#: The parts of an open_clip ``ResidualAttentionBlock`` and of a transformers ``CLIPEncoderLayer``
#: that hold the same weight and bias (q/k/v, fused in open_clip, are split apart by the callers).
_BLOCK_TWINS = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))


def _copy_affine(dst: nn.Module, src: nn.Module) -> None:
    """Weight and bias of a LayerNorm or Linear."""
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


def _copy_block(block: nn.Module, layer: nn.Module, *, into_open_clip: bool) -> None:
    """Every :data:`_BLOCK_TWINS` pair, from ``layer`` into ``block`` or the other way round."""
    for ours, theirs in _BLOCK_TWINS:
        a, b = block.get_submodule(ours), layer.get_submodule(theirs)
        _copy_affine(*((a, b) if into_open_clip else (b, a)))


# ------------------------------------------------------------------------------- open_clip -> hf
@dataclass
class _TextParts:
    """The text-tower pieces, wherever open_clip keeps them (``TextTransformer`` or ``CLIP``)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.LayerNorm
    text_projection: Any
    pool_type: str
    eos_id: int | None
    attn_mask: torch.Tensor | None


def _text_parts(module: nn.Module) -> _TextParts:
    if isinstance(module, TextTransformer):
        if module.cls_emb is not None:
            raise CheckpointError("open_clip text towers with a class token (CoCa) have no transformers CLIP equivalent.")
        pool, eos = module.pool_type, module.eos_id
    elif isinstance(module, CLIP):
        pool, eos = module.text_pool_type, getattr(module, "text_eos_id", None)
    else:
        raise CheckpointError(
            f"{type(module).__name__} is not an open_clip TextTransformer or CLIP; only those convert "
            "to a transformers CLIP text model."
        )
    return _TextParts(module.token_embedding, module.positional_embedding, module.transformer,
                      module.ln_final, module.text_projection, pool, eos, module.attn_mask)


def _hidden_act(block: nn.Module) -> str:
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise CheckpointError(f"open_clip text activation {act!r} has no transformers CLIP equivalent (quick_gelu or gelu).")


def _hf_config_for(parts: _TextParts, *, with_projection: bool, base: Mapping[str, Any] | None) -> dict[str, Any]:
    blocks = list(parts.transformer.resblocks)
    first = blocks[0]
    for block in blocks:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.ls_1, nn.Identity):
            raise CheckpointError(
                "the open_clip text tower uses custom blocks or layer scale, which transformers' CLIP "
                "text model cannot hold."
            )
    if parts.attn_mask is None:
        raise CheckpointError("the open_clip text tower is bidirectional; transformers' CLIP text model is causal.")
    if parts.pool_type not in ("argmax", "eos"):
        raise CheckpointError(
            f"open_clip text pool_type '{parts.pool_type}' has no transformers CLIP equivalent (argmax or eos)."
        )
    if isinstance(parts.text_projection, nn.Linear) and parts.text_projection.bias is not None:
        raise CheckpointError("a text projection with a bias has no transformers CLIP equivalent.")
    width = int(parts.token_embedding.weight.shape[1])
    projection_dim = width
    if with_projection:
        if parts.text_projection is None:
            raise CheckpointError("the open_clip text tower has no text projection to export with_projection.")
        proj = parts.text_projection
        projection_dim = int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
    eos = _LEGACY_EOS_ID if parts.pool_type == "argmax" else int(parts.eos_id)
    config = dict(base or {})
    config.update(
        vocab_size=int(parts.token_embedding.weight.shape[0]),
        hidden_size=width,
        intermediate_size=int(first.mlp.c_fc.out_features),
        num_hidden_layers=len(blocks),
        num_attention_heads=int(first.attn.num_heads),
        max_position_embeddings=int(parts.positional_embedding.shape[0]),
        hidden_act=_hidden_act(first),
        layer_norm_eps=float(parts.ln_final.eps),
        eos_token_id=eos,
    )
    if with_projection:
        config["projection_dim"] = projection_dim
    config.setdefault("projection_dim", projection_dim)  # unused without a projection; kept as given
    config.setdefault("bos_token_id", _BOS_ID)
    config.setdefault("attention_dropout", 0.0)
    return config


@torch.no_grad()
def hf_from_text_transformer(
    tower: nn.Module, *, with_projection: bool, hf_config: Mapping[str, Any] | None = None
) -> nn.Module:
    """A float32 transformers ``CLIPTextModel`` (or ``...WithProjection``) equal to an open_clip tower.

    ``tower`` is an open_clip ``TextTransformer`` or a ``CLIP`` (whose text parts live on the model
    itself). ``hf_config`` (e.g. a :class:`TextEncoderSpec`'s) supplies the fields the tower does
    not fix (token ids, init ranges); the architecture always comes from the tower.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = _text_parts(tower)
    config = CLIPTextConfig(**_hf_config_for(parts, with_projection=with_projection, base=hf_config))
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
    core = _core(model)
    core.embeddings.token_embedding.weight.copy_(parts.token_embedding.weight)
    core.embeddings.position_embedding.weight.copy_(parts.positional_embedding)
    for layer, block in zip(core.encoder.layers, parts.transformer.resblocks):
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        for linear, weight, bias in ((layer.self_attn.q_proj, q, qb), (layer.self_attn.k_proj, k, kb),
                                     (layer.self_attn.v_proj, v, vb)):
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        _copy_block(block, layer, into_open_clip=False)
    _copy_affine(core.final_layer_norm, parts.ln_final)
    if with_projection:
        proj = parts.text_projection
        model.text_projection.weight.copy_(proj.weight if isinstance(proj, nn.Linear) else proj.t())
    return model.float()


def hf_from_open_clip_text(clip_model: nn.Module, *, with_projection: bool = True) -> nn.Module:
    """The text tower of an open_clip model (e.g. ``ClipEncoder.model``) as a transformers model.

    A ``CLIP`` keeps its text parts on itself, a ``CustomTextCLIP`` in ``.text``; both convert.
    With ``with_projection`` the pooled projection survives as ``text_embeds``.
    """
    text = getattr(clip_model, "text", None)
    tower = text if isinstance(text, TextTransformer) else clip_model
    return hf_from_text_transformer(tower, with_projection=with_projection)


# ------------------------------------------------------------------------------------ forward pass
def encode_tower(
    tower: TextTransformer, tokens: torch.Tensor, *, hidden_layer: int = -1, final_layer_norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states B×L×width, pooled B×E)`` of one open_clip tower for token ids B×L (L ≤ its positions).

    States are block ``hidden_layer``'s output (through ``ln_final`` when ``final_layer_norm``);
    pooled is the full pass's final-LayerNorm'd EOS state, projected when the tower has a projection
    — transformers' ``text_embeds``, or ``pooler_output`` without one. Outputs are in compute dtype.
    """
    cast_dtype = tower.transformer.get_cast_dtype()
    length = tokens.shape[1]
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    # Slicing the causal mask lets tokenizers shorter than the positional table run.
    mask = tower.attn_mask[:length, :length]
    blocks = tower.transformer.resblocks
    take = len(blocks) + int(hidden_layer)
    batch_first = getattr(tower.transformer, "batch_first", True)
    x = x if batch_first else x.transpose(0, 1)
    states = x
    for index, block in enumerate(blocks):
        x = block(x, attn_mask=mask)
        if index == take:
            states = x
    if not batch_first:
        x, states = x.transpose(0, 1), states.transpose(0, 1)
    if final_layer_norm:
        states = tower.ln_final(states)
    x = tower.ln_final(x)
    if tower.pool_type == "argmax":
        where = tokens.argmax(dim=-1)
    else:
        where = (tokens == tower.eos_id).int().argmax(dim=-1)
    pooled = x[torch.arange(x.shape[0], device=x.device), where]
    proj = tower.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
    return states, pooled


__all__ = [
    "TextEncoderSpec",
    "encode_tower",
    "hf_config_dict",
    "hf_from_open_clip_text",
    "hf_from_text_transformer",
    "text_transformer_from_config",
    "text_transformer_from_hf",
]
