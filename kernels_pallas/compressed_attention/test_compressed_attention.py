"""compressed_attention (HCA / dense CSA / window-only) vs the jnp oracle, interpret mode."""

import jax.numpy as jnp

from kernels_pallas import compressed_attention, compressed_attention_reference
from kernels_pallas._testing import (attention_inputs, comp_segments, max_err, rel_err, segments, tpu_interpret_test,
                                     upcast, value_and_grads)

B, T, H, C, W = 2, 37, 3, 16, 8


def _check(q, kv, sink, comp, ratio, seg, cseg, kernel_kw, fwd_tol, grad_tol, relative=False):
    kern = value_and_grads(lambda q, kv, s, c: compressed_attention(
        q, kv, s, c, ratio=ratio, window=W, segment_ids=seg, comp_segment_ids=cseg, return_lse=True, **kernel_kw),
        (q, kv, sink, comp))
    qf, kvf, cf = upcast(q, kv, comp)
    ref = value_and_grads(lambda q, kv, s, c: compressed_attention_reference(
        q, kv, s, c, ratio=ratio, window=W, segment_ids=seg, comp_segment_ids=cseg, return_lse=True),
        (qf, kvf, sink, cf))
    err = rel_err if relative else max_err
    assert err(kern[0], ref[0]) < fwd_tol, "out"
    assert err(kern[1], ref[1]) < fwd_tol, "lse"
    for name, a, b in zip(("dq", "dkv", "dsink", "dcomp"), kern[2], ref[2]):
        assert err(a, b) < grad_tol, (name, err(a, b))


def test_fp32_dense_csa_segments():
    """ratio 4 (dense CSA), 3/2 documents per row, T=37 with block_q=8, entry blocks of 4 (the
    visibility boundary falls inside blocks), early queries with no visible entry."""
    ratio = 4
    q, kv, sink, comp = attention_inputs(B, T, H, C, T // ratio, seed=0)
    seg = segments(B, T)
    cseg = comp_segments(seg, T // ratio, ratio)
    _check(q, kv, sink, comp, ratio, jnp.asarray(seg), jnp.asarray(cseg),
           dict(block_q=8, block_k=8, block_c=4, interpret=True), 1e-5, 1e-4)


def test_bf16_hca():
    """HCA-like ratio 8 (4 entries), bf16 inputs vs fp32 reference on rounded inputs (2e-2 rel)."""
    ratio = 8
    q, kv, sink, comp = attention_inputs(B, T, H, C, T // ratio, seed=1, dtype=jnp.bfloat16)
    _check(q, kv, sink, comp, ratio, None, None, dict(block_q=16, block_k=8, block_c=8, interpret=True), 2e-2, 2e-2,
           relative=True)


def test_window_only_with_sink_and_segments():
    q, kv, sink, _ = attention_inputs(B, T, H, C, 0, seed=2)
    seg = jnp.asarray(segments(B, T, seed=2))
    kern = value_and_grads(lambda q, kv, s: compressed_attention(q, kv, s, None, ratio=4, window=W, segment_ids=seg,
                                                                 return_lse=True, block_q=8, block_k=8, interpret=True),
                           (q, kv, sink))
    ref = value_and_grads(lambda q, kv, s: compressed_attention_reference(q, kv, s, None, ratio=4, window=W,
                                                                          segment_ids=seg, return_lse=True),
                          (q, kv, sink))
    assert max_err(kern[0], ref[0]) < 1e-5 and max_err(kern[1], ref[1]) < 1e-5
    for a, b in zip(kern[2], ref[2]):
        assert max_err(a, b) < 1e-4


@tpu_interpret_test
def test_tpu_wrapper_in_tpu_interpreter():
    ratio = 4
    q, kv, sink, comp = attention_inputs(B, T, H, C, T // ratio, seed=3)
    seg = segments(B, T, seed=3)
    cseg = comp_segments(seg, T // ratio, ratio)
    _check(q, kv, sink, comp, ratio, jnp.asarray(seg), jnp.asarray(cseg), dict(backend="tpu", interpret=True),
           1e-5, 1e-4)
