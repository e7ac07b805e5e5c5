"""Lightning indexer of a CSA layer (spec 3.4): its own overlapping compressor at ``c_I``, queries
from the shared query latent ``c^Q``, ReLU-weighted multi-head scores, visibility mask, top-k.

Score: ``I[t, i] = sum_h w[t, h] * ReLU(q_I[t, h] . K_I[i])`` with
``w = (x W_w) * c_I^-1/2 * n_I^-1/2``. Selection: the top ``min(k, n_entries)`` visible entries;
picks that are not visible become -1. Ties are broken deterministically, the lower entry index
wins (``lax.top_k`` is stable), so a query's choice never depends on later tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.attention.compressor import Compressor, visible_entries
from v4jax.config import IndexerSpec, RopeSpec
from v4jax.layers.linear import Linear
from v4jax.layers.rope import apply_rope


def indexer_scores(q: jnp.ndarray, keys: jnp.ndarray, head_weights: jnp.ndarray) -> jnp.ndarray:
    """q ``[B, T, n_I, c_I]``, keys ``[B, N, c_I]``, head_weights ``[B, T, n_I]`` (already scaled)
    -> scores ``[B, T, N]`` in fp32."""
    s = jnp.einsum("bthd,bnd->bthn", q.astype(jnp.float32), keys.astype(jnp.float32))
    return jnp.einsum("bthn,bth->btn", jax.nn.relu(s), head_weights.astype(jnp.float32))


def select_topk(scores: jnp.ndarray, visible: jnp.ndarray, k: int) -> jnp.ndarray:
    """Top-``min(k, N)`` visible entries per query; invalid picks are -1. ``[B, T, N] -> [B, T, k']``."""
    n = scores.shape[-1]
    k = min(k, n)
    masked = jnp.where(visible, scores, -jnp.inf)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(masked), k)
    ok = jnp.take_along_axis(visible, idx, axis=-1)
    return jnp.where(ok, idx, -1).astype(jnp.int32)


class Indexer(nn.Module):
    """Parameters: ``wq_b [d_c, n_I*c_I]``, ``weights_proj [d, n_I]``, ``compressor.*``."""

    spec: IndexerSpec
    rope: RopeSpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "reference"   # "pallas": kernels_pallas.indexer_scores / indexer_topk (whole sequence)

    @nn.nowrap
    def queries(self, x: jnp.ndarray, qr: jnp.ndarray, positions: jnp.ndarray):
        s = self.spec
        B, T, _ = x.shape
        q = Linear(s.n_heads * s.head_dim, ("q_lora", "index_heads"), self.dtype, self.param_dtype,
                   name="wq_b")(qr).reshape(B, T, s.n_heads, s.head_dim)
        q = apply_rope(q, positions, self.rope)
        w = Linear(s.n_heads, ("embed", None), jnp.float32, self.param_dtype, name="weights_proj")(
            x.astype(jnp.float32))
        w = w * (s.head_dim ** -0.5 * s.n_heads ** -0.5)
        return q, w

    @nn.compact
    def __call__(self, x: jnp.ndarray, qr: jnp.ndarray, return_scores: bool = False,
                 state: dict | None = None, start: jnp.ndarray | None = None, n_valid=None,
                 segment_ids: jnp.ndarray | None = None):
        """x ``[B, T, d]``, qr ``[B, T, d_c]`` -> top-k indices ``[B, T, k']`` (and the scores,
        ``-inf`` where not visible). With a cache ``state`` and chunk start ``start``, also returns
        the new state (last). ``segment_ids [B, T]``: packed documents (no cache)."""
        s = self.spec
        T = x.shape[1]
        comp = Compressor(s.compressor, self.rope, self.param_dtype, name="compressor")
        if state is None:
            positions = jnp.arange(T)
            keys = comp(x, segment_ids=segment_ids)
        else:
            positions = start[:, None] + jnp.arange(T)
            keys, state = comp(x, state, start, n_valid)
        q, w = self.queries(x, qr, positions)
        if self.impl == "pallas" and state is None:
            import kernels_pallas as kp

            from v4jax.attention.compressor import entry_segments

            kseg = None if segment_ids is None else entry_segments(segment_ids, s.compressor.ratio)[:, :keys.shape[1]]
            scores = kp.indexer_scores(q, keys, w, ratio=s.compressor.ratio, segment_ids=segment_ids,
                                       key_segment_ids=kseg)
            idx = kp.indexer_topk(scores, s.topk)
            return (idx, scores) if return_scores else idx
        scores = indexer_scores(q, keys, w)
        visible = visible_entries(positions, keys.shape[1], s.compressor.ratio,
                                  segment_ids if state is None else None)
        if visible.ndim == 2:
            visible = visible[None]
        idx = select_topk(scores, visible, s.topk)
        out = (idx, jnp.where(visible, scores, -jnp.inf)) if return_scores else (idx,)
        if state is not None:
            out = out + (state,)
        return out if len(out) > 1 else idx
