"""indexer_scores / indexer_topk vs the jnp oracle, interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import indexer_scores, indexer_topk
from kernels_pallas._testing import comp_segments, max_err, rel_err, segments, tpu_interpret_test
from kernels_pallas.indexer import indexer_scores_reference, indexer_topk_reference

B, T, NI, CI, RATIO = 2, 37, 3, 16, 4
N = T // RATIO


def _inputs(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)
    return f(B, T, NI, CI), f(B, N, CI), jnp.asarray(rng.normal(size=(B, T, NI)), jnp.float32) * 0.3


def _run(fn, q, k, w):
    wg = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, N)), jnp.float32)

    def loss(q, k, w):
        s = fn(q, k, w)
        return jnp.sum(jnp.where(jnp.isfinite(s), s * wg, 0.0)), s

    (_, s), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, w)
    return s, g


@pytest.mark.parametrize("with_segments", [False, True])
def test_fp32_scores_grads_topk(with_segments):
    q, k, w = _inputs(0)
    kw = {}
    if with_segments:
        seg = segments(B, T)
        kw = dict(segment_ids=jnp.asarray(seg), key_segment_ids=jnp.asarray(comp_segments(seg, N, RATIO)))
    s, g = _run(lambda q, k, w: indexer_scores(q, k, w, ratio=RATIO, block_t=8, block_n=4, interpret=True, **kw),
                q, k, w)
    r, gr = _run(lambda q, k, w: indexer_scores_reference(q, k, w, ratio=RATIO, **kw), q, k, w)
    fin = jnp.isfinite(r)
    assert bool(jnp.all(fin == jnp.isfinite(s))) and bool(jnp.all(jnp.where(fin, True, s == -jnp.inf)))
    assert not bool(jnp.any(fin[:, :RATIO - 1]))  # early queries see nothing
    assert max_err(jnp.where(fin, s, 0), jnp.where(fin, r, 0)) < 1e-5
    for name, a, b in zip(("dq", "dk", "dw"), g, gr):
        assert max_err(a, b) < 1e-4, name
    for kk in (3, N + 5):
        assert bool(jnp.all(indexer_topk(s, kk) == indexer_topk_reference(q, k, w, kk, ratio=RATIO, **kw)))


def test_bf16():
    q, k, w = _inputs(1, jnp.bfloat16)
    s, g = _run(lambda q, k, w: indexer_scores(q, k, w, ratio=RATIO, interpret=True), q, k, w)
    r, gr = _run(lambda q, k, w: indexer_scores_reference(q, k, w.astype(jnp.float32), ratio=RATIO),
                 q.astype(jnp.float32), k.astype(jnp.float32), w)
    fin = jnp.isfinite(r)
    assert rel_err(jnp.where(fin, s, 0), jnp.where(fin, r, 0)) < 1e-5  # bf16 x bf16 products are exact in f32
    for a, b in zip(g, gr):
        assert rel_err(a, b) < 2e-2


@tpu_interpret_test
def test_tpu_wrapper_in_tpu_interpreter():
    q, k, w = _inputs(2)
    s, g = _run(lambda q, k, w: indexer_scores(q, k, w, ratio=RATIO, backend="tpu", interpret=True), q, k, w)
    r, gr = _run(lambda q, k, w: indexer_scores_reference(q, k, w, ratio=RATIO), q, k, w)
    fin = jnp.isfinite(r)
    assert max_err(jnp.where(fin, s, 0), jnp.where(fin, r, 0)) < 1e-5
    for a, b in zip(g, gr):
        assert max_err(a, b) < 1e-4
