"""Pure-jnp reference for the lightning-indexer kernels, self-contained:

* scores ``s[b,t,i] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,i])`` in fp32 (``w`` already
  scaled), ``-inf`` where entry i is not visible to query t: ``i < (t + 1) // ratio`` and, with
  segments, ``key_segment_ids[b, i] == segment_ids[b, t]``;
* top-k: the ``min(k, N)`` highest visible scores per query, best first, ``lax.top_k`` order (equal
  values: lower index first; note ``lax.top_k`` ranks ``+0.0`` above ``-0.0``), and ``-1`` for
  each pick that is not visible (queries with fewer than k visible entries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visibility(T: int, N: int, ratio: int, segment_ids=None, key_segment_ids=None, batch: int = 1):
    """``[B, T, N]`` bool: entry i visible to query t (``i < (t+1)//ratio``, same segment)."""
    vis = (jnp.arange(N)[None, :] < (jnp.arange(T) + 1)[:, None] // ratio)[None]
    vis = jnp.broadcast_to(vis, (batch, T, N))
    if segment_ids is not None:
        vis = vis & (segment_ids[:, :, None] == key_segment_ids[:, None, :])
    return vis


def relu_scores(q, keys, weights):
    """q ``[B,T,nI,cI]``, keys ``[B,N,cI]``, weights ``[B,T,nI]`` -> ``[B,T,N]`` fp32, no mask."""
    dots = jnp.einsum("bthd,bnd->bthn", q.astype(jnp.float32), keys.astype(jnp.float32))
    return jnp.einsum("bthn,bth->btn", jax.nn.relu(dots), weights.astype(jnp.float32))


def select_visible_topk(scores, visible, k: int):
    """Top-``min(k, N)`` entries of ``scores [B,T,N]`` among the ``visible`` ones, int32, ``-1``
    for picks that are not visible. No gradient flows through the selection."""
    k = min(int(k), scores.shape[-1])
    masked = jnp.where(visible, scores, -jnp.inf)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(masked), k)
    ok = jnp.take_along_axis(visible, idx, axis=-1)
    return jnp.where(ok, idx, -1).astype(jnp.int32)


def indexer_scores_reference(q, keys, weights, *, ratio, segment_ids=None, key_segment_ids=None):
    B, T = q.shape[:2]
    vis = visibility(T, keys.shape[1], ratio, segment_ids, key_segment_ids, B)
    return jnp.where(vis, relu_scores(q, keys, weights), -jnp.inf)


def indexer_topk_reference(q, keys, weights, k, *, ratio, segment_ids=None, key_segment_ids=None):
    B, T = q.shape[:2]
    vis = visibility(T, keys.shape[1], ratio, segment_ids, key_segment_ids, B)
    return select_visible_topk(relu_scores(q, keys, weights), vis, k)
