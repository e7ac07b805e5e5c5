"""MTP self-speculative decoding (``generate(..., speculative="mtp")``): greedy output identical to
plain greedy decoding through accepted and rejected drafts (an oracle drafter, then the MTP's own), per-row acceptance in a batch, and
sampled output with the model's distribution (a chi-square test against the exact distribution
from full forwards)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables, small_config
from scipy import stats as sps

import v4jax
from v4jax.inference import speculative
from v4jax.inputs import InputError

CFG = small_config(n_mtp_layers=1, max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    return v4jax.V4Model(CFG, random_variables(CFG, seed=3))


def _oracle(truth, every=3):
    """A drafter that knows the plain greedy continuation (``truth [B, L]`` by absolute position) and
    gets it right except at positions divisible by ``every``: both accept and reject paths, per row."""
    truth = jnp.asarray(truth)

    def draft(logits, key, temperature, top_p, positions):
        tok, q = speculative._pick(logits, key, temperature, top_p)
        pos = jnp.clip(positions, 0, truth.shape[1] - 1)
        right = truth[jnp.arange(truth.shape[0]), pos]
        wrong = (right + 1) % logits.shape[-1]
        return jnp.where(positions % every == 0, wrong, right).astype(jnp.int32), q

    return draft


def test_greedy_speculative_equals_plain_greedy_with_mixed_acceptance(model, monkeypatch):
    """Three prompts of different lengths (right-padded), chunked prefill, a stop token in one row:
    the tokens, the fill after the stop and the streamed ``on_token`` calls equal plain greedy
    decoding, while the drafts are accepted at about 2/3 of the positions."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 256, (3, 13)).astype(np.int32)
    lengths = np.array([13, 9, 5])
    plain = model.generate(ids, 20, lengths=lengths, stop_tokens=())
    stop = int(plain[1, 11])                        # row 1 stops at its 12th token (maybe others earlier)
    seen_a, seen_b = [], []
    want = model.generate(ids, 20, lengths=lengths, stop_tokens=(stop,), on_token=lambda i, t: seen_a.append((i, t.tolist())))
    truth = np.zeros((3, CFG.max_seq_len + 4), np.int32)
    for b in range(3):
        truth[b, :lengths[b]] = ids[b, :lengths[b]]
        truth[b, lengths[b]:lengths[b] + 20] = plain[b]
    fresh = v4jax.V4Model(CFG, model.variables)          # its own jitted functions (traced with the oracle)
    monkeypatch.setattr(speculative, "draft_tokens", _oracle(truth))
    st = {}
    got = fresh.generate(ids, 20, lengths=lengths, stop_tokens=(stop,), chunk_size=5, speculative="mtp", stats=st,
                         on_token=lambda i, t: seen_b.append((i, t.tolist())))
    np.testing.assert_array_equal(got, want)
    assert seen_b == seen_a
    assert 0.4 < st["acceptance"] < 0.9 and st["steps"] < 20, st
    got_all = fresh.generate(ids, 20, lengths=lengths, stop_tokens=(), speculative="mtp")
    np.testing.assert_array_equal(got_all, plain)
    # the MTP block's own drafts (random weights: nearly all rejected): still exactly plain greedy
    monkeypatch.undo()
    st = {}
    got_mtp = model.generate(ids, 20, lengths=lengths, stop_tokens=(), chunk_size=5, speculative="mtp", stats=st)
    np.testing.assert_array_equal(got_mtp, plain)
    assert st["drafted"] > 0


def test_speculative_errors(model):
    no_mtp = small_config(n_mtp_layers=0, max_seq_len=64)
    m = v4jax.V4Model(no_mtp, random_variables(no_mtp, seed=0))
    with pytest.raises(InputError, match="n_mtp_layers = 0"):
        m.generate(np.ones((1, 4), np.int32), 3, speculative="mtp")
    with pytest.raises(InputError, match="'medusa'"):
        model.generate(np.ones((1, 4), np.int32), 3, speculative="medusa")


def test_sampled_speculative_tokens_have_the_model_distribution():
    """Vocabulary 8, temperature 1.3, 6000 rows of one prompt: the joint of the 2nd and 3rd new
    tokens (the first speculative step and either its bonus token or the next step) and the 2nd
    token's marginal match the exact distribution from full forwards (chi-square, p > 1e-3),
    with drafts both accepted and rejected."""
    cfg = small_config(n_mtp_layers=1, max_seq_len=32, vocab_size=8)
    m = v4jax.V4Model(cfg, random_variables(cfg, seed=5))
    prompt = np.array([[3, 1, 4, 1, 5, 2, 6]], np.int32)
    T, N = 1.3, 6000
    st = {}
    out = m.generate(np.repeat(prompt, N, 0), 3, temperature=T, seed=11, stop_tokens=(), speculative="mtp", stats=st)
    assert out.shape == (N, 3)
    assert 0.1 < st["acceptance"] < 0.95, st

    def probs(seqs):
        logits = np.asarray(m(jnp.asarray(seqs)), np.float64)[:, -1] / T
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    V = 8
    p1 = probs(prompt)[0]
    p2 = probs(np.concatenate([np.repeat(prompt, V, 0), np.arange(V)[:, None]], 1))          # [x1, x2]
    pre = np.array([list(prompt[0]) + [a, b] for a in range(V) for b in range(V)], np.int32)
    p3 = probs(pre).reshape(V, V, V)                                                        # [x1, x2, x3]
    joint23 = np.einsum("a,ab,abc->bc", p1, p2, p3)
    marg2 = joint23.sum(1)
    obs23 = np.zeros((V, V))
    np.add.at(obs23, (out[:, 1], out[:, 2]), 1)
    for obs, exp in ((obs23.ravel(), N * joint23.ravel()), (obs23.sum(1), N * marg2)):
        keep = exp > 5          # the usual validity rule; the rest pooled
        o = np.append(obs[keep], obs[~keep].sum())
        e = np.append(exp[keep], exp[~keep].sum())
        o, e = (o, e) if e[-1] > 0 else (o[:-1], e[:-1])
        chi2 = float(((o - e) ** 2 / e).sum())
        p = sps.chi2.sf(chi2, len(o) - 1)
        assert p > 1e-3, (chi2, len(o), p)
    # and the first token (plain sampling from the prefill) as a control
    obs1 = np.bincount(out[:, 0], minlength=V)
    assert sps.chisquare(obs1, N * p1 / p1.sum()).pvalue > 1e-3
