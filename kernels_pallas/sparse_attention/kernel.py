"""CSA hot path: sliding window + per-query top-k compressed entries + sink, one online softmax.

See ``kernels_pallas/attention_core/`` for the kernels (``tpu.py``: Mosaic wrapper with SMEM index
blocks and per-row DMA gathers; ``portable.py``: Triton / interpreter wrapper with vector gathers
and atomic scatter-add in the backward)."""

from __future__ import annotations

from kernels_pallas.attention_core import attention


def sparse_attention(q, kv, sink, comp, topk, *, window, scale=None, segment_ids=None, return_lse=False,
                     block_q=None, block_k=None, chunk_k=None, comp_chunk_rows=None, backend=None, interpret=None):
    """q ``[B,T,H,c]``; kv ``[B,T,c]`` (keys = values, row s = position s); sink ``[H]``;
    comp ``[B,N,c]`` (N may be 0 or comp None); topk ``[B,T,K]`` int32 entry indices, -1 = empty
    (the entries of one row must be distinct, as ``lax.top_k`` gives; visibility is not re-checked).

    Key set of query t: window keys ``0 <= t-s < window`` in the same segment (``segment_ids
    [B,T]`` or None), plus the listed compressed entries. fp32 accumulation; ``scale`` defaults to
    ``c**-0.5``. Returns ``out [B,T,H,c]`` fp32 (and ``lse [B,T,H]`` fp32, the log of the full
    denominator including the sink, with ``return_lse=True``). Differentiable in q, kv, comp and
    sink (custom_vjp, lse cotangent included). ``block_q``: query tokens per block; ``block_k``:
    kv rows per window block; ``chunk_k``: top-k entries per gather step; ``comp_chunk_rows``
    (TPU backward only): rows of the fp32 ``dcomp`` accumulator kept in VMEM per pass (default
    from the chip's VMEM; more entries than that cost one extra pass each); ``backend``: None =
    ``jax.default_backend()``; ``interpret``: None = auto (CPU), True forces an interpreter."""
    out, lse = attention(q, kv, sink, comp, topk, mode="topk", window=window, scale=scale,
                         segment_ids=segment_ids, block_q=block_q, block_k=block_k, chunk_k=chunk_k,
                         comp_chunk_rows=comp_chunk_rows, backend=backend, interpret=interpret)
    return (out, lse) if return_lse else out
