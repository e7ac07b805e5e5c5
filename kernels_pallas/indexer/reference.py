"""Pure-jnp reference for the lightning-indexer kernel, built on the model's oracle
(``indexer_scores``, ``visible_entries``, ``select_topk``)."""

from __future__ import annotations

import jax.numpy as jnp

from v4jax.attention.compressor import visible_entries
from v4jax.attention.indexer import indexer_scores as _oracle_scores
from v4jax.attention.indexer import select_topk


def visibility(T: int, N: int, ratio: int, segment_ids=None, key_segment_ids=None, batch: int = 1):
    vis = jnp.broadcast_to(visible_entries(jnp.arange(T), N, ratio)[None], (batch, T, N))
    if segment_ids is not None:
        vis = vis & (segment_ids[:, :, None] == key_segment_ids[:, None, :])
    return vis


def indexer_scores_reference(q, keys, weights, *, ratio, segment_ids=None, key_segment_ids=None):
    B, T = q.shape[:2]
    vis = visibility(T, keys.shape[1], ratio, segment_ids, key_segment_ids, B)
    return jnp.where(vis, _oracle_scores(q, keys, weights), -jnp.inf)


def indexer_topk_reference(q, keys, weights, k, *, ratio, segment_ids=None, key_segment_ids=None):
    B, T = q.shape[:2]
    vis = visibility(T, keys.shape[1], ratio, segment_ids, key_segment_ids, B)
    return select_topk(_oracle_scores(q, keys, weights), vis, k)
