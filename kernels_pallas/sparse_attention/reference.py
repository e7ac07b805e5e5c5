"""Pure-jnp reference for ``sparse_attention`` (CSA top-k), built on the model's oracle:
``attention_reference`` with a ``kv_mask`` (window, and same segment) and ``topk_to_mask``."""

from __future__ import annotations

from v4jax.attention.core import attention_reference, topk_to_mask

from kernels_pallas._reference_common import window_kv_mask


def sparse_attention_reference(q, kv, sink, comp, topk, *, window, scale=None, segment_ids=None,
                               return_lse=False):
    B, T = q.shape[:2]
    kv_mask = window_kv_mask(T, window, segment_ids, B)
    N = 0 if comp is None else comp.shape[1]
    comp_mask = topk_to_mask(topk, N) if N > 0 else None
    return attention_reference(q, kv, sink, window, comp if N > 0 else None, comp_mask, scale=scale,
                              kv_mask=kv_mask, return_lse=return_lse)
