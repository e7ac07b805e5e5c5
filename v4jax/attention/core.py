"""Core attention (spec 3.5), the jnp oracle: one softmax over [sliding-window keys | compressed
entries | per-head sink], shared K=V single head broadcast over query heads, fp32 throughout.

This dense masked form is the reference every faster path (the gather form below, the Pallas
kernels in ``kernels_pallas``) is tested against.
"""

from __future__ import annotations

import jax.numpy as jnp


def window_mask(q_pos: jnp.ndarray, k_pos: jnp.ndarray, window: int) -> jnp.ndarray:
    """Key s is in query t's window iff ``t - window < s <= t`` (``window`` keys, t included)."""
    d = q_pos[:, None] - k_pos[None, :]
    return (d >= 0) & (d < window)


def attention_reference(q: jnp.ndarray, kv: jnp.ndarray, sink: jnp.ndarray, window: int,
                        comp: jnp.ndarray | None = None, comp_mask: jnp.ndarray | None = None,
                        scale: float | None = None, kv_mask: jnp.ndarray | None = None,
                        return_lse: bool = False):
    """Dense masked sparse attention.

    q ``[B, T, H, c]``; kv ``[B, T, c]`` (window keys = values, position t at row t);
    sink ``[H]``; comp ``[B, N, c]`` compressed entries; comp_mask ``[B, T, N]`` bool
    (visibility, and for CSA top-k membership). ``kv_mask`` ``[B, T, S]`` replaces the default
    sliding window over ``S = T`` keys (used with a KV cache, where keys are ring slots + chunk, and
    for packed documents). Returns ``[B, T, H, c]`` in fp32, and with ``return_lse`` also the log
    of each softmax denominator (sink included) ``[B, T, H]``.
    """
    B, T, H, c = q.shape
    scale = c ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32)
    kvf = kv.astype(jnp.float32)
    S = kv.shape[1]
    s_win = jnp.einsum("bthc,bsc->bhts", qf, kvf) * scale
    if kv_mask is None:
        pos = jnp.arange(T)
        kv_mask = window_mask(pos, pos, window)[None]
    s_win = jnp.where(kv_mask[:, None], s_win, -jnp.inf)
    parts = [s_win]
    if comp is not None and comp.shape[1] > 0:
        cf = comp.astype(jnp.float32)
        s_cmp = jnp.einsum("bthc,bnc->bhtn", qf, cf) * scale
        s_cmp = jnp.where(comp_mask[:, None], s_cmp, -jnp.inf)
        parts.append(s_cmp)
    sink_col = jnp.broadcast_to(sink.astype(jnp.float32)[None, :, None, None], (B, H, T, 1))
    logits = jnp.concatenate(parts + [sink_col], axis=-1)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / denom
    lse = (m + jnp.log(denom))[..., 0].transpose(0, 2, 1)
    out = jnp.einsum("bhts,bsc->bthc", p[..., :S], kvf)
    if len(parts) == 2:
        out = out + jnp.einsum("bhtn,bnc->bthc", p[..., S:S + comp.shape[1]], cf)
    return (out, lse) if return_lse else out


def topk_to_mask(idx: jnp.ndarray, n_entries: int) -> jnp.ndarray:
    """Index lists ``[B, T, k]`` (-1 = none) -> membership mask ``[B, T, N]``."""
    hit = idx[..., None] == jnp.arange(n_entries)
    return jnp.any(hit & (idx[..., None] >= 0), axis=-2)
