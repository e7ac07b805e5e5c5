"""HCA / dense-CSA / window-only attention: sliding window + ALL visible compressed entries +
sink, one online softmax. See ``kernels_pallas/attention_core/`` for the kernels."""

from __future__ import annotations

from kernels_pallas.attention_core import attention


def compressed_attention(q, kv, sink, comp, *, ratio, window, scale=None, segment_ids=None,
                         comp_segment_ids=None, return_lse=False, block_q=None, block_k=None, block_c=None,
                         backend=None, interpret=None):
    """q ``[B,T,H,c]``; kv ``[B,T,c]``; sink ``[H]``; comp ``[B,N,c]`` or None / N=0 (then pure
    sliding-window attention with sink). Query t sees window keys ``0 <= t-s < window`` (same
    segment) and every entry ``i < (t+1)//ratio`` with ``comp_segment_ids[b,i] ==
    segment_ids[b,t]`` (``comp_segment_ids [B,N]`` is required when ``segment_ids`` is given and
    N > 0). Returns ``out [B,T,H,c]`` fp32 (and ``lse [B,T,H]`` with ``return_lse=True``);
    custom_vjp gradients for q, kv, comp, sink. ``block_c``: compressed entries per block."""
    out, lse = attention(q, kv, sink, comp, None, mode="dense", window=window, ratio=ratio, scale=scale,
                         segment_ids=segment_ids, comp_segment_ids=comp_segment_ids, block_q=block_q,
                         block_k=block_k, block_c=block_c, backend=backend, interpret=interpret)
    return (out, lse) if return_lse else out
