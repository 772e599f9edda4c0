"""Caption decoding: greedy / beam / top-k / top-p generation from the autoregressive head, the
log-probabilities it samples from, and the logits function of the masked-diffusion head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiff.errors import ConfigError
from mmdiff.models.caption_heads import CaptionTransformer, ImageContext
from mmdiff.models.caption_vocab import CaptionVocab

DECODINGS = ("greedy", "beam", "topk", "topp")


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
    "Decoded",
    "DECODINGS",
    "decode",
    "filter_logits",
    "masked_logits_fn",
    "sequence_logprob",
]
