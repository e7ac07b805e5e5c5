"""jnp pieces shared by the attention references: masks from the model's oracle helpers and the
log-denominator (``lse``) of the same softmax ``attention_reference`` computes."""

from __future__ import annotations

import jax.numpy as jnp

from v4jax.attention.core import window_mask


def window_kv_mask(T: int, window: int, segment_ids=None, batch: int = 1) -> jnp.ndarray:
    """``[B, T, T]`` bool: sliding-causal window, and same segment when ``segment_ids [B, T]``."""
    pos = jnp.arange(T)
    m = window_mask(pos, pos, window)[None]
    if segment_ids is None:
        return jnp.broadcast_to(m, (batch, T, T))
    return m & (segment_ids[:, :, None] == segment_ids[:, None, :])


def reference_lse(q, kv, sink, kv_mask, comp=None, comp_mask=None, scale=None) -> jnp.ndarray:
    """``log(sum_j exp(z_j) + exp(sink_h))`` over the same key set, ``[B, T, H]`` fp32."""
    B, T, H, c = q.shape
    scale = c ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32)
    s = jnp.einsum("bthc,bsc->bths", qf, kv.astype(jnp.float32)) * scale
    parts = [jnp.where(kv_mask[:, :, None], s, -jnp.inf)]
    if comp is not None and comp.shape[1] > 0:
        sc = jnp.einsum("bthc,bnc->bthn", qf, comp.astype(jnp.float32)) * scale
        parts.append(jnp.where(comp_mask[:, :, None], sc, -jnp.inf))
    parts.append(jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], (B, T, H, 1)))
    logits = jnp.concatenate(parts, axis=-1)
    m = jnp.max(logits, axis=-1, keepdims=True)
    return (m + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)))[..., 0]
