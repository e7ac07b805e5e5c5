"""sparse_attention (CSA top-k) vs the jnp oracle, interpret mode on CPU (portable wrapper; the
TPU wrapper under Pallas' TPU interpreter is the ``slow`` test at the end)."""

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import sparse_attention, sparse_attention_reference
from kernels_pallas._testing import (attention_inputs, comp_segments, max_err, random_topk, rel_err, segments,
                                     tpu_interpret_test, upcast, value_and_grads)

B, T, H, C, W, RATIO, K = 2, 37, 3, 16, 8, 4, 3  # T not a multiple of any block size
N = T // RATIO


def _check(q, kv, sink, comp, topk, seg, kernel_kw, fwd_tol, grad_tol, relative=False):
    kern = value_and_grads(lambda q, kv, s, c: sparse_attention(q, kv, s, c, topk, window=W, segment_ids=seg,
                                                                return_lse=True, **kernel_kw), (q, kv, sink, comp))
    qf, kvf, cf = upcast(q, kv, comp)
    ref = value_and_grads(lambda q, kv, s, c: sparse_attention_reference(q, kv, s, c, topk, window=W, segment_ids=seg,
                                                                         return_lse=True), (qf, kvf, sink, cf))
    err = rel_err if relative else max_err
    assert err(kern[0], ref[0]) < fwd_tol, "out"
    assert err(kern[1], ref[1]) < fwd_tol, "lse"
    for name, a, b in zip(("dq", "dkv", "dsink", "dcomp"), kern[2], ref[2]):
        assert a.dtype == b.dtype or relative, name
        assert err(a, b) < grad_tol, (name, err(a, b))


def test_fp32_segments_ragged_topk_lse():
    """B=2, 3 and 2 documents per row, -1 slots at the tail (early t: all -1) and mid-list, T=37
    with block_q=8 (padding), window blocks of 8 (several per query block)."""
    q, kv, sink, comp = attention_inputs(B, T, H, C, N, seed=0)
    seg = segments(B, T)
    topk = random_topk(B, T, N, K, RATIO, seg, comp_segments(seg, N, RATIO))
    assert (np.asarray(topk)[:, :RATIO - 1] == -1).all() and (np.asarray(topk) == -1).any()
    _check(q, kv, sink, comp, topk, jnp.asarray(seg), dict(block_q=8, block_k=8, interpret=True), 1e-5, 1e-4)


def test_bf16_single_token_blocks():
    """bf16 inputs (fp32 accumulation) vs the fp32 reference on the bf16-rounded inputs; block_q=1
    exercises the one-scatter-per-chunk path the GPU wrapper uses. Tolerance: 2e-2 of the max
    magnitude (p and dO enter the MXU-style matmuls in bf16)."""
    q, kv, sink, comp = attention_inputs(B, T, H, C, N, seed=1, dtype=jnp.bfloat16)
    topk = random_topk(B, T, N, K, RATIO, seed=1)
    _check(q, kv, sink, comp, topk, None, dict(block_q=1, block_k=16, chunk_k=2, interpret=True), 2e-2, 2e-2,
           relative=True)


def test_no_compressed_entries_is_window_only_custom_scale():
    q, kv, sink, comp = attention_inputs(1, 20, 2, 8, 0, seed=2)
    topk = jnp.zeros((1, 20, 0), jnp.int32)
    kern = jax.jit(lambda q, kv, s, c: sparse_attention(q, kv, s, c, topk, window=5, scale=0.3, return_lse=True,
                                                        block_q=8, block_k=8, interpret=True))
    out, lse = kern(q, kv, sink, comp)
    ref, ref_lse = sparse_attention_reference(q, kv, sink, comp, topk, window=5, scale=0.3, return_lse=True)
    assert out.shape == (1, 20, 2, 8) and out.dtype == jnp.float32 and lse.shape == (1, 20, 2)
    assert max_err(out, ref) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    out2 = jax.jit(lambda q, kv, s: sparse_attention(q, kv, s, None, None, window=5, scale=0.3, block_q=8,
                                                     block_k=8, interpret=True))(q, kv, sink)
    assert max_err(out2, ref) < 1e-5


@tpu_interpret_test
def test_tpu_wrapper_in_tpu_interpreter():
    """The Mosaic wrapper (SMEM index blocks, per-row DMA gathers, VMEM dcomp scatter) run under
    ``pltpu.InterpretParams`` (simulated DMAs/semaphores), fwd + grads."""
    q, kv, sink, comp = attention_inputs(B, T, H, C, N, seed=3)
    seg = segments(B, T)
    topk = random_topk(B, T, N, K, RATIO, seg, comp_segments(seg, N, RATIO), seed=3)
    _check(q, kv, sink, comp, topk, jnp.asarray(seg), dict(backend="tpu", interpret=True), 1e-5, 1e-4)
