"""Caption heads: vocabulary, shapes, teacher forcing, the four AR decodings, masked completion."""
from __future__ import annotations

import pytest
import torch

from mmdiff.diffusion.discrete import MaskedDiffusion
from mmdiff.models.caption_decoding import decode, filter_logits, masked_logits_fn, sequence_logprob
from mmdiff.models.caption_heads import CaptionTransformer, teacher_forcing_loss
from mmdiff.models.caption_vocab import CaptionVocab
from mmdiff.models.clip import _simple_tokenizer

CAPTIONS = [
    "a handwritten digit seven",
    "the number 3 written by hand",
    "a photo of the digit two",
    "someone wrote the number five",
]


@pytest.fixture(scope="module")
def tokenizer():
    return _simple_tokenizer(32)


@pytest.fixture(scope="module")
def vocab(tokenizer) -> CaptionVocab:
    return CaptionVocab(tokenizer, 10, CaptionVocab.shortlist(tokenizer, CAPTIONS, 64))


def make_head(vocab: CaptionVocab, causal: bool, seed: int = 0) -> CaptionTransformer:
    torch.manual_seed(seed)
    return CaptionTransformer(
        vocab.size, vocab.max_length, 12, 16, width=32, layers=1, heads=2, dropout=0.0, causal=causal
    ).eval()


def features(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randn(n, 5, 16, generator=g)


def test_vocab_round_trip_and_layout(vocab: CaptionVocab, tokenizer) -> None:
    ids = vocab.encode(CAPTIONS)
    assert ids.shape == (4, 10)
    assert (ids[:, 0] == vocab.sot).all()
    assert vocab.decode(ids) == CAPTIONS
    # after the end token only padding, which has a slot of its own (not open_clip's 0 = "!")
    row = ids[0].tolist()
    end = row.index(vocab.eot)
    assert all(i == vocab.pad for i in row[end + 1 :])
    assert len({vocab.pad, vocab.mask, vocab.unk, vocab.sot, vocab.eot}) == 5
    # tokens outside the shortlist become unk and are dropped when decoding
    assert vocab.decode(vocab.encode(["a zebra digit"])) == ["a digit"]
    # too long: cut, the end token kept
    long = vocab.encode(["a " * 30])[0]
    assert int(long[-1]) == vocab.eot
    # an open prefix for completion
    prefix = vocab.encode(["a handwritten"], add_eot=False)
    assert int(vocab.prefix_length(prefix)[0]) == 3


def test_full_vocabulary(tokenizer) -> None:
    full = CaptionVocab(tokenizer, 10)
    assert full.size == 49408 + 3 and full.mask == 49410
    assert full.decode(full.encode(["a zebra digit!"])) == ["a zebra digit!"]


@pytest.mark.parametrize("causal", [True, False])
def test_shapes(vocab: CaptionVocab, causal: bool) -> None:
    head = make_head(vocab, causal)
    ctx = head.context(*features(3))
    assert ctx.prefix.shape == (3, 1, 32) and ctx.memory.shape == (3, 5, 32)
    logits = head(ctx, vocab.encode(CAPTIONS[:3]))
    assert logits.shape == (3, 10, vocab.size)


def test_causal_head_does_not_look_ahead(vocab: CaptionVocab) -> None:
    head = make_head(vocab, causal=True)
    ctx = head.context(*features(1))
    ids = vocab.encode(CAPTIONS[:1])
    changed = ids.clone()
    changed[0, 4] = vocab.encode(["two"])[0, 1]
    a, b = head(ctx, ids), head(ctx, changed)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_teacher_forcing_loss_decreases(vocab: CaptionVocab) -> None:
    torch.manual_seed(0)
    head = make_head(vocab, causal=True).train()
    pooled, tokens = features(4)
    ids = vocab.encode(CAPTIONS)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = teacher_forcing_loss(head, head.context(pooled, tokens), ids, vocab.pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    head.eval()
    out = decode(head, head.context(pooled, tokens), vocab, decoding="greedy")
    assert vocab.decode(out.ids) == CAPTIONS  # memorised the toy pairs


def _valid(vocab: CaptionVocab, ids: torch.Tensor) -> None:
    for row in ids.tolist():
        assert row[0] == vocab.sot
        assert vocab.eot in row, row
        end = row.index(vocab.eot)
        assert all(i == vocab.pad for i in row[end + 1 :])
        assert not {vocab.sot, vocab.pad, vocab.mask, vocab.unk} & set(row[1:end])


@pytest.mark.parametrize("decoding", ["greedy", "beam", "topk", "topp"])
def test_decodings_give_valid_sequences(vocab: CaptionVocab, decoding: str) -> None:
    head = make_head(vocab, causal=True)
    ctx = head.context(*features(3))
    out = decode(head, ctx, vocab, decoding=decoding, generator=torch.Generator().manual_seed(0), beam_size=3)
    assert out.ids.shape == (3, vocab.max_length)
    _valid(vocab, out.ids)
    # the reported log-probability is the model's
    assert torch.allclose(out.logprob, sequence_logprob(head, ctx, out.ids, vocab), atol=1e-4)


def test_sampling_is_seeded(vocab: CaptionVocab) -> None:
    head = make_head(vocab, causal=True)
    ctx = head.context(*features(4))
    a = decode(head, ctx, vocab, decoding="topp", top_p=0.95, generator=torch.Generator().manual_seed(1))
    b = decode(head, ctx, vocab, decoding="topp", top_p=0.95, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.ids, b.ids)


@pytest.mark.parametrize("seed", range(4))
def test_beam_scores_at_least_greedy(vocab: CaptionVocab, seed: int) -> None:
    head = make_head(vocab, causal=True, seed=seed)
    ctx = head.context(*features(4, seed))
    greedy = decode(head, ctx, vocab, decoding="greedy")
    beam = decode(head, ctx, vocab, decoding="beam", beam_size=4)
    assert (beam.logprob >= greedy.logprob - 1e-5).all()


@pytest.mark.parametrize("decoding", ["greedy", "beam", "topk"])
def test_ar_completion_keeps_prefix(vocab: CaptionVocab, decoding: str) -> None:
    head = make_head(vocab, causal=True)
    ctx = head.context(*features(2))
    prefix = vocab.encode(["a handwritten", "someone wrote the"], add_eot=False)
    out = decode(head, ctx, vocab, decoding=decoding, prefix=prefix, generator=torch.Generator().manual_seed(0))
    texts = vocab.decode(out.ids)
    assert texts[0].startswith("a handwritten") and texts[1].startswith("someone wrote the")


def test_filter_logits() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.5)).sum()
    assert int(kept) == 1  # softmax mass of the top token is 0.64 > 0.5
    assert torch.isfinite(filter_logits(logits, top_p=0.9)).sum() == 3


def test_masked_head_completes_and_denoises(vocab: CaptionVocab) -> None:
    head = make_head(vocab, causal=False)
    ctx = head.context(*features(3))
    diffusion = MaskedDiffusion(vocab.mask, vocab.size)
    prefix = vocab.encode(["a handwritten"] * 3, add_eot=False)
    known = torch.arange(vocab.max_length) < vocab.prefix_length(prefix).unsqueeze(1)
    tokens = torch.where(known, prefix, torch.full_like(prefix, vocab.mask))
    for steps in (1, 4):
        out = diffusion.sample(masked_logits_fn(head, ctx, vocab), 3, vocab.max_length, steps=steps,
                               tokens=tokens, known=known, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out[known], prefix[known])
        assert not (out == vocab.mask).any()
        assert all(t.startswith("a handwritten") for t in vocab.decode(out))
    # a loss over the clean captions, start token known
    ids = vocab.encode(CAPTIONS[:3])
    start = torch.zeros_like(ids, dtype=torch.bool)
    start[:, 0] = True
    loss = diffusion.loss(lambda x, t: head(ctx, x), ids, known=start)["loss"]
    assert torch.isfinite(loss) and loss > 0
