"""Caption heads over open_clip image features: an autoregressive decoder and a masked-diffusion denoiser.

Both heads are the same small pre-norm transformer (:class:`CaptionTransformer`): caption token
embeddings + learned positions, with the projected pooled CLIP image embedding as a *prefix
token* in front of the caption, and cross-attention from every block to the projected per-patch
CLIP image tokens. ``causal=True`` makes it the autoregressive decoder (teacher forcing, then
greedy / beam / top-k / top-p decoding by :func:`decode`); ``causal=False`` makes it the
bidirectional denoiser that :class:`mmdiff.diffusion.MaskedDiffusion` trains and samples (the
system wires the two — this module holds networks and token bookkeeping only).

Vocabulary (:class:`CaptionVocab`): open_clip's own tokenizer (the one of the ``ClipEncoder``),
so start/end ids come from it. The head works in *head ids*: a list of tokenizer ids (the whole
tokenizer vocabulary, or — ``model.caption.vocab_limit: N`` — the N most frequent tokens of the
training captions, which keeps the output softmax small on a CPU), followed by four slots of its
own:

- ``unk``: a tokenizer id outside the shortlist (never generated);
- ``pad``: the positions after the end token. open_clip pads with id 0, which is also the
  token "!", so the head gives padding a slot of its own instead;
- ``mask``: the absorbing state of masked diffusion (the embedding table is extended rather than
  reusing a real token id);
- (``sot``/``eot`` stay the tokenizer's own ids, mapped like any other token.)

A caption is ``[sot, w1 … wn, eot, pad …]`` of ``max_length`` head ids (longer captions are cut
and keep their end token).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiff.errors import ConfigError

DECODINGS = ("greedy", "beam", "topk", "topp")


# ------------------------------------------------------------------------------- vocabulary
def _special_ids(tokenizer: Any) -> Tuple[int, int, int]:
    """(sot, eot, pad) of an open_clip tokenizer, read from how it tokenizes the empty string."""
    row = tokenizer([""], context_length=4)[0].tolist()
    return int(row[0]), int(row[1]), int(row[-1])


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Number of ids an open_clip tokenizer can produce."""
    value = getattr(tokenizer, "vocab_size", None)
    if isinstance(value, int) and value > 0:
        return value
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a HF tokenizer
    if inner is not None and hasattr(inner, "__len__"):
        return len(inner)
    encoder = getattr(tokenizer, "encoder", None)
    if encoder is not None:
        return len(encoder)
    raise ConfigError(f"cannot tell the vocabulary size of tokenizer {type(tokenizer).__name__}.")


class CaptionVocab(nn.Module):
    """Captions ↔ head ids over an open_clip tokenizer (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        token_ids: Optional[Sequence[int]] = None,
        tokenizer_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if max_length < 3:
            raise ConfigError(f"model.caption.max_length must be >= 3, got {max_length}.")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.sot_token, self.eot_token, self.pad_token = _special_ids(tokenizer)
        n_tok = int(tokenizer_size or tokenizer_vocab_size(tokenizer))
        self.full = token_ids is None
        ids = torch.arange(n_tok) if token_ids is None else torch.tensor(list(token_ids), dtype=torch.long)
        for special in (self.sot_token, self.eot_token):
            if not bool((ids == special).any()):
                ids = torch.cat([ids, torch.tensor([special])])
        self.register_buffer("ids", ids, persistent=False)
        k = len(ids)
        self.unk, self.pad, self.mask = k, k + 1, k + 2
        self.size = k + 3
        lookup = torch.full((max(n_tok, int(ids.max()) + 1),), self.unk, dtype=torch.long)
        lookup[ids] = torch.arange(k)
        self.register_buffer("lookup", lookup, persistent=False)
        self.sot = int(lookup[self.sot_token])
        self.eot = int(lookup[self.eot_token])

    # ------------------------------------------------------------------------------ building
    @staticmethod
    def shortlist(tokenizer: Any, captions: Iterable[str], limit: int) -> List[int]:
        """The ``limit`` most frequent tokenizer ids in ``captions`` (ties by id), start/end included."""
        sot, eot, _ = _special_ids(tokenizer)
        counts: Counter[int] = Counter()
        batch: List[str] = []

        def flush() -> None:
            if batch:
                for row in tokenizer(batch, context_length=1024).tolist():
                    end = row.index(eot) if eot in row else len(row)
                    counts.update(row[1:end])
                batch.clear()

        for caption in captions:
            batch.append(caption)
            if len(batch) >= 512:
                flush()
        flush()
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        keep = [sot, eot] + [i for i, _ in ranked if i not in (sot, eot)]
        return keep[: max(limit, 2)]

    # ------------------------------------------------------------------------------ encoding
    def forbidden(self) -> List[int]:
        """Head ids a head must never generate after the start position."""
        return [self.sot, self.unk, self.mask]

    def encode(self, captions: Sequence[str], add_eot: bool = True) -> Tensor:
        """Captions → head ids B×max_length ``[sot, …, eot, pad …]`` (cut to fit, keeping eot).

        ``add_eot=False`` gives an open prefix instead: ``[sot, w1 … wk, pad …]`` (for completion).
        """
        tokens = self.tokenizer(list(captions), context_length=1024).long()
        out = torch.full((len(captions), self.max_length), self.pad, dtype=torch.long)
        for row, toks in enumerate(tokens.tolist()):
            end = toks.index(self.eot_token) if self.eot_token in toks else len(toks)
            words = toks[1:end][: self.max_length - 2 if add_eot else self.max_length - 1]
            seq = [self.sot_token, *words] + ([self.eot_token] if add_eot else [])
            out[row, : len(seq)] = self.lookup[torch.tensor(seq)]
        return out.to(self.ids.device)

    def prefix_length(self, ids: Tensor) -> Tensor:
        """Per row, the number of leading non-pad ids (for open prefixes from ``encode(add_eot=False)``)."""
        return (ids != self.pad).long().cumprod(dim=1).sum(dim=1)

    def decode(self, ids: Tensor) -> List[str]:
        """Head ids B×L → captions: up to the first end token; start, pad, unk and mask dropped."""
        texts = []
        specials = {self.sot, self.pad, self.unk, self.mask}
        table = self.ids.cpu().tolist()
        for row in ids.detach().cpu().tolist():
            words: List[int] = []
            for i in row:
                if i == self.eot:
                    break
                if i not in specials and 0 <= i < len(table):
                    words.append(table[i])
            texts.append(_clean(self._decode_ids(words)) if words else "")
        return texts

    def _decode_ids(self, ids: List[int]) -> str:
        decode = getattr(self.tokenizer, "decode", None)
        if decode is None:  # open_clip's HFTokenizer wraps a Hugging Face tokenizer that decodes
            decode = self.tokenizer.tokenizer.decode
        return decode(ids)


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([!?.,;:')])")


def _clean(text: str) -> str:
    text = text.replace("<start_of_text>", "").replace("<end_of_text>", "")
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))


# ------------------------------------------------------------------------------- the network
class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, kv_width: Optional[int] = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width or width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor, context: Tensor, causal: bool = False) -> Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-norm: self-attention, cross-attention to the image tokens, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads, dropout)
        self.ln_cross = nn.LayerNorm(width)
        self.cross_attn = _Attention(width, heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, causal: bool) -> Tensor:
        h = self.ln_self(x)
        x = x + self.drop(self.self_attn(h, h, causal=causal))
        x = x + self.drop(self.cross_attn(self.ln_cross(x), memory))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


@dataclass
class ImageContext:
    """Projected image features for one batch: the prefix token B×1×D and the memory B×N×D."""

    prefix: Tensor
    memory: Tensor

    def repeat(self, n: int) -> "ImageContext":
        """Each row repeated ``n`` times in place (row i → rows i·n … i·n+n-1), for beams/samples."""
        return ImageContext(self.prefix.repeat_interleave(n, 0), self.memory.repeat_interleave(n, 0))

    def index(self, rows: Tensor) -> "ImageContext":
        return ImageContext(self.prefix[rows], self.memory[rows])


class CaptionTransformer(nn.Module):
    """Caption transformer conditioned on CLIP (pooled, tokens); causal (AR) or bidirectional (masked).

    ``forward(ctx, ids)`` returns logits B×L×vocab_size for the head ids ``ids`` (B×L): with
    ``causal=True`` position i predicts ids[i+1]; with ``causal=False`` position i predicts the
    clean token at i.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        pooled_dim: int,
        token_width: int,
        *,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        causal: bool = True,
    ) -> None:
        super().__init__()
        if width % heads != 0:
            raise ConfigError(f"model.caption.width {width} must be divisible by model.caption.heads {heads}.")
        self.causal = bool(causal)
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.randn(max_length + 1, width) * 0.02)
        self.prefix_proj = nn.Sequential(nn.LayerNorm(pooled_dim), nn.Linear(pooled_dim, width))
        self.memory_proj = nn.Sequential(nn.LayerNorm(token_width), nn.Linear(token_width, width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # output layer tied to token_embedding
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def context(self, pooled: Tensor, tokens: Tensor) -> ImageContext:
        """CLIP ``(pooled B×E, tokens B×N×W)`` → :class:`ImageContext`."""
        return ImageContext(self.prefix_proj(pooled).unsqueeze(1), self.memory_proj(tokens))

    def hidden(self, ctx: ImageContext, ids: Tensor) -> Tensor:
        """Final hidden states B×L×D at the caption positions (the prefix position dropped)."""
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"captions of {length} tokens exceed max_length {self.max_length}.")
        x = torch.cat([ctx.prefix, self.token_embedding(ids)], dim=1) + self.positions[: length + 1]
        for block in self.blocks:
            x = block(x, ctx.memory, self.causal)
        return self.ln_final(x[:, 1:])

    def project(self, hidden: Tensor) -> Tensor:
        """Hidden states … × D → logits … × vocab_size (weights tied to the token embedding)."""
        return F.linear(hidden, self.token_embedding.weight, self.bias)

    def forward(self, ctx: ImageContext, ids: Tensor) -> Tensor:
        return self.project(self.hidden(ctx, ids))


# ------------------------------------------------------------------ autoregressive training
def teacher_forcing_loss(
    head: CaptionTransformer, ctx: ImageContext, ids: Tensor, pad: int, label_smoothing: float = 0.0
) -> Tensor:
    """Mean next-token cross-entropy (nats per token) over every target up to and including eot.

    Only the non-padding positions are projected to the vocabulary, which matters for the full
    49k-token vocabulary.
    """
    hidden = head.hidden(ctx, ids[:, :-1])
    target = ids[:, 1:]
    keep = target != pad
    return F.cross_entropy(
        head.project(hidden[keep]), target[keep], label_smoothing=label_smoothing
    )


def sequence_logprob(head: CaptionTransformer, ctx: ImageContext, ids: Tensor, vocab: "CaptionVocab") -> Tensor:
    """Sum of log p(token | image, earlier tokens) over each row's tokens after sot (B,).

    The distribution is the one :func:`decode` samples from: start, pad, unk and mask excluded.
    """
    logits = head(ctx, ids[:, :-1]).float()
    logits[..., vocab.forbidden() + [vocab.pad]] = float("-inf")
    logp = F.log_softmax(logits, dim=-1)
    target = ids[:, 1:]
    keep = target != vocab.pad
    picked = logp.gather(-1, torch.where(keep, target, torch.zeros_like(target)).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked)).sum(dim=1)


# ------------------------------------------------------------------ autoregressive decoding
def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Set every logit outside the top-k, or outside the smallest nucleus of mass top_p, to -inf."""
    logits = logits.clone()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits.float(), dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


@dataclass
class Decoded:
    """Generated head ids B×L (``[sot, …, eot, pad …]``) and their log-probabilities (B,)."""

    ids: Tensor
    logprob: Tensor


def decode(
    head: CaptionTransformer,
    ctx: ImageContext,
    vocab: CaptionVocab,
    *,
    decoding: str = "greedy",
    prefix: Optional[Tensor] = None,
    temperature: float = 1.0,
    top_k: int = 10,
    top_p: float = 0.9,
    beam_size: int = 4,
    length_penalty: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Decoded:
    """Autoregressive captioning: ``greedy``, ``beam``, ``topk`` or ``topp`` (with ``temperature``).

    ``prefix`` (B×L head ids from ``vocab.encode(texts, add_eot=False)``) forces the first tokens
    (a partly written caption to complete). ``logprob`` is the model's log-probability of the
    generated tokens at temperature 1 (forced prefix tokens included). Beam search scores
    hypotheses by the summed log-probability divided by ``length ** length_penalty`` (0 = the plain
    sum, which makes it an approximate maximum-likelihood search).
    """
    if decoding not in DECODINGS:
        raise ConfigError(f"unknown decoding '{decoding}'; choose one of: {', '.join(DECODINGS)}.")
    batch = ctx.prefix.shape[0]
    device = ctx.prefix.device
    length = vocab.max_length
    if prefix is None:
        prefix = torch.full((batch, length), vocab.pad, dtype=torch.long, device=device)
        prefix[:, 0] = vocab.sot
    prefix = prefix.to(device)
    forced = vocab.prefix_length(prefix)
    banned = torch.tensor(vocab.forbidden() + [vocab.pad], device=device)

    def logprobs(ids: Tensor, rows_ctx: ImageContext) -> Tensor:
        logits = head(rows_ctx, ids)[:, -1].float()
        logits[:, banned] = float("-inf")
        return F.log_softmax(logits, dim=-1)

    if decoding == "beam":
        beam = _beam_search(logprobs, ctx, vocab, prefix, forced, beam_size, length_penalty)
        # Beam search can prune the greedy path; keeping the greedy caption as a candidate means
        # a wider search never scores below greedy decoding.
        greedy = _sequential(logprobs, ctx, vocab, prefix, forced, "greedy", 1.0, top_k, top_p, generator)
        better = _score(greedy, vocab, length_penalty) > _score(beam, vocab, length_penalty)
        return Decoded(
            torch.where(better.unsqueeze(1), greedy.ids, beam.ids),
            torch.where(better, greedy.logprob, beam.logprob),
        )
    return _sequential(logprobs, ctx, vocab, prefix, forced, decoding, temperature, top_k, top_p, generator)


def _score(out: Decoded, vocab: CaptionVocab, length_penalty: float) -> Tensor:
    """Beam search's ranking score: log-probability / (generated tokens incl. eot) ** length_penalty."""
    n = ((out.ids != vocab.pad).sum(dim=1) - 1).clamp(min=1).float()
    return out.logprob / n.pow(length_penalty)


def _sequential(
    logprobs: Callable[[Tensor, ImageContext], Tensor],
    ctx: ImageContext,
    vocab: CaptionVocab,
    prefix: Tensor,
    forced: Tensor,
    decoding: str,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: Optional[torch.Generator],
) -> Decoded:
    """Greedy or sampled decoding, one token per step for the whole batch."""
    batch, length, device = prefix.shape[0], vocab.max_length, prefix.device
    ids = prefix.clone()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    total = torch.zeros(batch, device=device)
    for pos in range(1, length):
        logp = logprobs(ids[:, :pos], ctx)
        if pos == length - 1:
            choice = torch.full((batch,), vocab.eot, dtype=torch.long, device=device)
        elif decoding == "greedy" or temperature == 0:
            choice = logp.argmax(-1)
        else:
            filtered = filter_logits(
                logp,
                top_k=top_k if decoding == "topk" else None,
                top_p=top_p if decoding == "topp" else None,
            )
            probs = F.softmax(filtered / temperature, dim=-1)
            choice = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
        is_forced = pos < forced
        choice = torch.where(is_forced, ids[:, pos], choice)
        choice = torch.where(done, torch.full_like(choice, vocab.pad), choice)
        gained = logp.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        total = total + torch.where(done, torch.zeros_like(gained), gained)
        ids[:, pos] = choice
        done = done | ((choice == vocab.eot) & ~is_forced)
        if bool(done.all()):
            break
    return Decoded(ids, total)


def _beam_search(
    logprobs: Callable[[Tensor, ImageContext], Tensor],
    ctx: ImageContext,
    vocab: CaptionVocab,
    prefix: Tensor,
    forced: Tensor,
    beam_size: int,
    length_penalty: float,
) -> Decoded:
    """Per-image beam search; finished hypotheses compete on the length-normalised score."""
    length = vocab.max_length
    out_ids, out_lp = [], []
    for row in range(prefix.shape[0]):
        row_ctx = ctx.index(torch.tensor([row], device=prefix.device))
        n_forced = int(forced[row])
        beams = prefix[row : row + 1, :n_forced].clone()
        scores = torch.zeros(1, device=prefix.device)
        finished: List[Tuple[float, float, Tensor]] = []  # (normalised score, logprob, ids)
        if n_forced > 1:  # the forced tokens' log-probability counts like any other
            scores = sequence_logprob_prefix(logprobs, row_ctx, beams)
        for pos in range(n_forced, length):
            logp = logprobs(beams, row_ctx.repeat(beams.shape[0]))
            if pos == length - 1:  # the last position can only end the caption
                only_eot = torch.full_like(logp, float("-inf"))
                only_eot[:, vocab.eot] = logp[:, vocab.eot]
                logp = only_eot
            cand = (scores.unsqueeze(1) + logp).flatten()
            top = torch.topk(cand, min(2 * beam_size, int(torch.isfinite(cand).sum())))
            next_beams, next_scores = [], []
            for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                src, token = divmod(flat, logp.shape[1])
                seq = torch.cat([beams[src], torch.tensor([token], device=beams.device)])
                if token == vocab.eot:
                    n = seq.shape[0] - 1
                    finished.append((score / (n ** length_penalty), score, seq))
                else:
                    next_beams.append(seq)
                    next_scores.append(score)
                if len(next_beams) == beam_size:
                    break
            if not next_beams:
                break
            beams = torch.stack(next_beams)
            scores = torch.tensor(next_scores, device=beams.device)
            best_done = max((f[0] for f in finished), default=float("-inf"))
            # Log-probabilities only fall as a hypothesis grows: with the plain sum (no length
            # normalisation) no open beam can beat a finished one that already scores higher.
            if length_penalty == 0 and best_done >= float(scores.max()):
                break
        _, lp, seq = max(finished, key=lambda f: f[0])
        ids = torch.full((length,), vocab.pad, dtype=torch.long, device=prefix.device)
        ids[: seq.shape[0]] = seq
        out_ids.append(ids)
        out_lp.append(lp)
    return Decoded(torch.stack(out_ids), torch.tensor(out_lp, device=prefix.device))


def sequence_logprob_prefix(
    logprobs: Callable[[Tensor, ImageContext], Tensor], ctx: ImageContext, ids: Tensor
) -> Tensor:
    """Log-probability (1,) of the forced tokens ids[0, 1:] of a single-row prefix."""
    total = torch.zeros(1, device=ids.device)
    for pos in range(1, ids.shape[1]):
        total = total + logprobs(ids[:, :pos], ctx)[:, ids[0, pos]]
    return total


# ------------------------------------------------------------------ masked-diffusion helpers
def masked_logits_fn(
    head: CaptionTransformer,
    ctx: ImageContext,
    vocab: CaptionVocab,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``logits_fn(x_t, t)`` for :class:`MaskedDiffusion`: the bidirectional head ignores ``t``
    (MDLM without time conditioning, so the sampler's cache is valid); start/unk never predicted,
    optional top-k / top-p filtering for sampling."""
    banned = [vocab.sot, vocab.unk]

    def logits_fn(x_t: Tensor, t: Tensor) -> Tensor:
        logits = head(ctx, x_t).float()
        logits[..., banned] = float("-inf")
        if top_k is not None or top_p is not None:
            logits = filter_logits(logits, top_k=top_k, top_p=top_p)
        return logits

    return logits_fn


__all__ = [
    "CaptionVocab",
    "CaptionTransformer",
    "ImageContext",
    "Decoded",
    "DECODINGS",
    "decode",
    "filter_logits",
    "masked_logits_fn",
    "sequence_logprob",
    "teacher_forcing_loss",
    "tokenizer_vocab_size",
]
