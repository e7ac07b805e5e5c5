"""Routers (spec 5). Learned: top-K of ``s + b`` (the bias b only selects). Hash: ``tid2eid[id]``.
Both weight the chosen experts by ``s_sel / sum(s_sel) * route_scale`` with ``s`` the affinity."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def affinity(logits: jnp.ndarray, score_func: str) -> jnp.ndarray:
    """Router affinities ``s`` from logits, fp32."""
    logits = logits.astype(jnp.float32)
    if score_func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


def topk_route(scores: jnp.ndarray, bias: jnp.ndarray, k: int) -> jnp.ndarray:
    """Expert ids ``[..., k]`` chosen by ``scores + bias`` (no gradient through the choice)."""
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores + bias.astype(scores.dtype)), k)
    return idx


def hash_route(token_ids: jnp.ndarray, tid2eid: jnp.ndarray) -> jnp.ndarray:
    """Fixed expert ids ``[..., k]`` from the token ids; independent of the hidden state."""
    return jnp.take(tid2eid, token_ids, axis=0).astype(jnp.int32)


def gate_weights(scores: jnp.ndarray, idx: jnp.ndarray, route_scale: float) -> jnp.ndarray:
    """``s_sel / sum(s_sel) * route_scale`` ``[..., k]``."""
    w = jnp.take_along_axis(scores, idx, axis=-1)
    return w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20) * route_scale


def sequence_balance_stats(scores: jnp.ndarray, idx: jnp.ndarray, n_experts: int):
    """Per-sequence ``f_e`` and ``P_e`` of the V3/V4 sequence-wise balance loss (techniques 5.1).

    scores ``[B, T, E]``, idx ``[B, T, K]``. ``f_e = E/(K T) * #tokens routed to e``,
    ``P_e = mean_t s_e / sum_j s_j``. Returns (f ``[B, E]``, P ``[B, E]``, load ``[E]`` counts)."""
    B, T, K = idx.shape
    counts = jnp.sum(jax.nn.one_hot(idx, n_experts, dtype=jnp.float32), axis=(2,))  # [B,T,E]
    per_seq = jnp.sum(counts, axis=1)  # [B, E]
    f = per_seq * (n_experts / (K * T))
    p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)
    return f, p, jnp.sum(per_seq, axis=0)
