"""Masked (absorbing-state) diffusion for tokens: masking rates, ELBO, sampler, caching, learnability."""
from __future__ import annotations

import math

import pytest
import torch

from mmdiff.diffusion import MaskedDiffusion

V, MASK = 12, 11


def uniform_logits(x, t):
    return torch.zeros(*x.shape, V)


class Calls:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, x, t):
        self.n += 1
        return self.fn(x, t)


def test_masking_rates_follow_schedule():
    md = MaskedDiffusion(MASK, V, eps=1e-3)
    tokens = torch.randint(0, MASK, (4, 20000), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x = md.q_sample(tokens, t, torch.Generator().manual_seed(1))
    rate = (x == MASK).float().mean(1)
    torch.testing.assert_close(rate, (1 - 1e-3) * t, atol=0.01, rtol=0)
    assert torch.equal(x[x != MASK], tokens[x != MASK])  # unmasked tokens untouched
    keep = torch.zeros_like(tokens, dtype=torch.bool)
    keep[:, :100] = True
    assert not (md.q_sample(tokens, torch.ones(4), keep=keep)[:, :100] == MASK).any()
    ts = md.sample_t(8, torch.Generator().manual_seed(2))
    assert float(ts.min()) >= 1e-3 and float(ts.max()) <= 1.0
    assert sorted(((ts - 1e-3) / (1 - 1e-3) * 8).floor().long().tolist()) == list(range(8))  # stratified


def test_loss_equals_closed_form_weights():
    md = MaskedDiffusion(MASK, V)
    tokens = torch.randint(0, MASK, (6, 16), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    out = md.loss(uniform_logits, tokens, t=t, generator=torch.Generator().manual_seed(4))
    # Same draw, by hand: each masked token costs log(V-1) nats (uniform over non-mask ids), weight 1/t.
    x_t = md.q_sample(tokens, t, torch.Generator().manual_seed(4))
    masked = (x_t == MASK).float()
    expected = (masked * math.log(V - 1) / t[:, None]).sum() / tokens.numel()
    torch.testing.assert_close(out["loss"], expected)
    assert torch.isfinite(out["loss"])
    # In expectation over the masks the ELBO of the uniform model is (1-ε)·log(V-1) for every t.
    big = torch.randint(0, MASK, (64, 512), generator=torch.Generator().manual_seed(5))
    for tt in (0.05, 0.5, 1.0):
        val = md.loss(uniform_logits, big, t=torch.full((64,), tt), generator=torch.Generator().manual_seed(6))["loss"]
        assert float(val) == pytest.approx((1 - 1e-3) * math.log(V - 1), rel=0.05)


def test_loss_pad_and_known_positions():
    md = MaskedDiffusion(MASK, V)
    tokens = torch.randint(0, MASK, (3, 10), generator=torch.Generator().manual_seed(7))
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[:, 7:] = True
    seen = {}

    def spy(x, t):
        seen["x"] = x
        return uniform_logits(x, t)

    out = md.loss(spy, tokens, pad, torch.Generator().manual_seed(8), t=torch.ones(3))
    assert not (seen["x"][:, 7:] == MASK).any()
    assert float(out["loss"]) == pytest.approx((seen["x"] == MASK).sum().item() * math.log(V - 1) / 21)
    with pytest.raises(ValueError, match="contain the mask id"):
        md.loss(uniform_logits, torch.full((1, 3), MASK))


def test_sampler_fills_keeps_and_is_seeded():
    md = MaskedDiffusion(MASK, V)
    logits = lambda x, t: torch.randn(*x.shape, V, generator=torch.Generator().manual_seed(int(x.sum())))
    out = md.sample(logits, 4, 12, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 12) and not (out == MASK).any() and int(out.max()) < V
    again = md.sample(logits, 4, 12, steps=5, generator=torch.Generator().manual_seed(0))
    other = md.sample(logits, 4, 12, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    # A written prefix is kept, the rest filled.
    tokens = torch.full((4, 12), MASK)
    tokens[:, :3] = torch.tensor([1, 2, 3])
    done = md.sample(logits, 4, 12, steps=4, tokens=tokens, generator=torch.Generator().manual_seed(2))
    assert (done[:, :3] == torch.tensor([1, 2, 3])).all() and not (done == MASK).any()
    # Explicit known mask + partial re-masking of a full sequence (start from a corrupted one).
    full = torch.randint(0, MASK, (4, 12), generator=torch.Generator().manual_seed(3))
    known = torch.zeros(12, dtype=torch.bool)
    known[:2] = True
    redo = md.sample(logits, 4, 12, steps=4, tokens=full, known=known, strength=0.5,
                     generator=torch.Generator().manual_seed(4))
    assert torch.equal(redo[:, :2], full[:, :2]) and not (redo == MASK).any()
    assert 0 < int((redo != full).sum()) < redo.numel()
    # Greedy (temperature 0) picks the argmax.
    greedy = md.sample(lambda x, t: torch.nn.functional.one_hot(torch.full(x.shape, 5), V).float(), 2, 6,
                       steps=3, temperature=0.0)
    assert (greedy == 5).all()


def test_caching_skips_calls_when_nothing_changed():
    md = MaskedDiffusion(MASK, V)
    cached, uncached = Calls(uniform_logits), Calls(uniform_logits)
    a = md.sample(cached, 2, 4, steps=64, generator=torch.Generator().manual_seed(5))
    b = md.sample(uncached, 2, 4, steps=64, generator=torch.Generator().manual_seed(5), cache=False)
    assert torch.equal(a, b)  # same result, the model ignores t
    # Without the cache: one call per step until the last mask is gone (≤ 64 steps); with it: a
    # call only after a step that revealed something — at most one per token (8 tokens).
    assert 8 < uncached.n <= 64 and cached.n <= 8


def test_bad_arguments():
    md = MaskedDiffusion(MASK, V)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        md.sample(uniform_logits, 1, 4, steps=0)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        md.sample(uniform_logits, 1, 4, strength=0.0)
    with pytest.raises(ValueError, match="known position holds the mask token"):
        md.sample(uniform_logits, 1, 4, tokens=torch.full((1, 4), MASK), known=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_id 12 must be a token id below vocab_size 12"):
        MaskedDiffusion(12, V)


def test_tiny_model_learns_a_fixed_set_of_sequences():
    """A small MLP learns 4 fixed sequences with the ELBO; samples reproduce them."""
    torch.manual_seed(0)
    L = 6
    data = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [7, 7, 8, 8, 9, 9], [1, 3, 5, 7, 9, 10]])
    md = MaskedDiffusion(MASK, V)
    net = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Flatten(), torch.nn.Linear(16 * L, 128),
                              torch.nn.SiLU(), torch.nn.Linear(128, L * V))
    logits_fn = lambda x, t: net(x).reshape(x.shape[0], L, V)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        batch = data[torch.randint(0, 4, (64,), generator=g)]
        loss = md.loss(logits_fn, batch, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        # Tokens revealed in the same step are drawn independently, so few steps mix sequences
        # (6 steps: ~65% exact); with 32 steps reveals are mostly one at a time.
        out = md.sample(logits_fn, 64, L, steps=32, generator=torch.Generator().manual_seed(2))
        hits = (out[:, None, :] == data[None]).all(-1).any(-1).float().mean()
        assert float(hits) >= 0.9
        # Completing a partly written sequence: the prefix picks the sequence.
        prompt = torch.full((8, L), MASK)
        prompt[:, :2] = torch.tensor([7, 7])
        done = md.sample(logits_fn, 8, L, steps=4, tokens=prompt, generator=torch.Generator().manual_seed(3))
        assert (done == data[2]).all(-1).float().mean() >= 0.75
