"""Caption vocabulary: captions ↔ head ids over an open_clip tokenizer.

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
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mmdiff.errors import ConfigError


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


__all__ = ["CaptionVocab", "tokenizer_vocab_size"]
