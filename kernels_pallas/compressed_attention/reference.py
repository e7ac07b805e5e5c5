"""Pure-jnp reference for ``compressed_attention`` (HCA / dense CSA / window-only),
self-contained: one dense masked softmax per query over ``[window keys | every visible compressed
entry | sink]``, the single K=V head shared by all query heads, fp32 throughout.

Key set of query t in row b:

* window key s:        ``0 <= t - s < window`` and ``segment_ids[b, s] == segment_ids[b, t]``;
* compressed entry i:  visible, ``i < (t + 1) // ratio`` (its whole block ``[i*ratio, (i+1)*ratio)``
  is at or before t), and ``comp_segment_ids[b, i] == segment_ids[b, t]``;
* the per-head sink ``sink[h]``: a logit with no value.
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


def visible_entry_mask(T: int, N: int, ratio: int, segment_ids=None, comp_segment_ids=None,
                       batch: int = 1) -> jnp.ndarray:
    """``[B, T, N]`` bool, ``[b, t, i]``: ``i < (t + 1) // ratio``, and with ``segment_ids [B, T]``
    also ``comp_segment_ids[b, i] == segment_ids[b, t]`` (``comp_segment_ids [B, N]`` required)."""
    vis = (jnp.arange(N)[None, :] < (jnp.arange(T) + 1)[:, None] // ratio)[None]
    if segment_ids is None:
        return jnp.broadcast_to(vis, (batch, T, N))
    if comp_segment_ids is None:
        raise ValueError("comp_segment_ids is required when segment_ids is given")
    return vis & (segment_ids[:, :, None] == comp_segment_ids[:, None, :])


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


def compressed_attention_reference(q, kv, sink, comp, *, ratio, window, scale=None, segment_ids=None,
                                   comp_segment_ids=None, return_lse=False):
    """Same arguments and results as ``compressed_attention`` (comp ``[B,N,c]``, None or N=0 for
    window-only); out (and lse) in fp32."""
    B, T = q.shape[:2]
    kv_mask = window_kv_mask(T, window, segment_ids, B)
    N = 0 if comp is None else comp.shape[1]
    comp_mask = visible_entry_mask(T, N, ratio, segment_ids, comp_segment_ids, B) if N > 0 else None
    return _attend(q, kv, sink, comp if N > 0 else None, kv_mask, comp_mask, scale, return_lse)
