"""Pure-jnp reference for ``sparse_attention`` (CSA top-k), self-contained: one dense masked
softmax per query over ``[window keys | the compressed entries its top-k list names | sink]``,
the single K=V head shared by all query heads, fp32 throughout, ``O(T * (T + N))`` memory.

Key set of query t in row b:

* window key s:        ``0 <= t - s < window`` and ``segment_ids[b, s] == segment_ids[b, t]``;
* compressed entry i:  ``i`` appears in ``topk[b, t]`` (``-1`` slots name nothing; the list is
  taken as given, visibility is not re-checked, exactly like the kernel);
* the per-head sink ``sink[h]``: a logit with no value (it only adds ``exp(sink)`` to the
  denominator).
"""

from __future__ import annotations

import jax.numpy as jnp


def window_kv_mask(T: int, window: int, segment_ids=None, batch: int = 1) -> jnp.ndarray:
    """``[B, T, T]`` bool, ``[b, t, s]``: key s is in query t's sliding window
    (``0 <= t - s < window``, t itself included) and, with ``segment_ids [B, T]``, in its document."""
    t = jnp.arange(T)
    d = t[:, None] - t[None, :]
    m = ((d >= 0) & (d < window))[None]
    if segment_ids is None:
        return jnp.broadcast_to(m, (batch, T, T))
    return m & (segment_ids[:, :, None] == segment_ids[:, None, :])


def topk_mask(topk: jnp.ndarray, N: int) -> jnp.ndarray:
    """Top-k lists ``[B, T, K]`` int (``-1`` = empty slot) -> membership ``[B, T, N]`` bool."""
    hit = (topk[..., :, None] == jnp.arange(N)) & (topk[..., :, None] >= 0)  # [B, T, K, N]
    return jnp.any(hit, axis=-2)


def _attend(q, kv, sink, comp, kv_mask, comp_mask, scale, return_lse):
    """softmax over ``[kv | comp | sink]`` with the masks (False -> logit ``-inf``); the sink
    logit is always there, so no row is empty. Returns ``out [B,T,H,c]`` (and ``lse [B,T,H]``)."""
    B, T, H, c = q.shape
    scale = c ** -0.5 if scale is None else scale
    keys, mask = kv.astype(jnp.float32), kv_mask
    if comp is not None and comp.shape[1] > 0:
        keys = jnp.concatenate([keys, comp.astype(jnp.float32)], axis=1)  # [B, T + N, c], keys = values
        mask = jnp.concatenate([kv_mask, comp_mask], axis=-1)             # [B, T, T + N]
    logits = jnp.einsum("bthc,bsc->bths", q.astype(jnp.float32), keys) * scale
    logits = jnp.where(mask[:, :, None, :], logits, -jnp.inf)
    sink_logit = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], (B, T, H, 1))
    logits = jnp.concatenate([logits, sink_logit], axis=-1)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bths,bsc->bthc", p[..., :-1] / denom, keys)  # the sink has no value row
    lse = (m + jnp.log(denom))[..., 0]
    return (out, lse) if return_lse else out


def sparse_attention_reference(q, kv, sink, comp, topk, *, window, scale=None, segment_ids=None,
                               return_lse=False):
    """Same arguments and results as ``sparse_attention`` (q ``[B,T,H,c]``, kv ``[B,T,c]``,
    sink ``[H]``, comp ``[B,N,c]`` or None, topk ``[B,T,K]``); out (and lse) in fp32."""
    B, T = q.shape[:2]
    kv_mask = window_kv_mask(T, window, segment_ids, B)
    N = 0 if comp is None else comp.shape[1]
    comp_mask = topk_mask(topk, N) if N > 0 and topk is not None else None
    if comp_mask is None:
        comp = None
    return _attend(q, kv, sink, comp, kv_mask, comp_mask, scale, return_lse)
