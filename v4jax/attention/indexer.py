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

from v4jax.attention.compressor import Compressor
from v4jax.config import IndexerSpec, RopeSpec
from v4jax.layers.linear import Linear
from v4jax.layers.quantized import qat_format
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
    """Parameters: ``wq_b [d_c, n_I*c_I]``, ``weights_proj [d, n_I]``, ``compressor.*``.

    Both entry points return the indexer's features; which entries are selected (and how: the
    oracle's full score matrix, the chunked running top-k, a Pallas kernel) is the attention
    implementation's business (``v4jax.attention.backend``).

    ``__call__(x, qr, segment_ids=None)``: whole sequence, x ``[B, T, d]``, qr ``[B, T, d_c]``
    -> (q ``[B, T, n_I, c_I]``, keys ``[B, T // 4, c_I]``, head weights ``[B, T, n_I]`` fp32,
    already scaled by ``c_I^-1/2 n_I^-1/2``).
    ``extend(x, qr, state, start, n_valid)``: a chunk against the cached key compressor
    -> (q, every cached key ``[B, max_len // 4, c_I]``, weights, new state)."""

    spec: IndexerSpec
    rope: RopeSpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        s = self.spec
        self.wq_b = Linear(s.n_heads * s.head_dim, ("q_lora", "index_heads"), self.dtype, self.param_dtype,
                           fake_quant=qat_format(s.qat, "fp8"))
        self.weights_proj = Linear(s.n_heads, ("embed", "index_heads"), jnp.float32, self.param_dtype)
        self.compressor = Compressor(s.compressor, self.rope, self.param_dtype)

    def queries(self, x: jnp.ndarray, qr: jnp.ndarray, positions: jnp.ndarray):
        s = self.spec
        B, T, _ = x.shape
        q = self.wq_b(qr).reshape(B, T, s.n_heads, s.head_dim)
        q = apply_rope(q, positions, self.rope)
        w = self.weights_proj(x.astype(jnp.float32)) * (s.head_dim ** -0.5 * s.n_heads ** -0.5)
        return q, w

    def __call__(self, x: jnp.ndarray, qr: jnp.ndarray, segment_ids: jnp.ndarray | None = None):
        keys = self.compressor(x, segment_ids=segment_ids)
        q, w = self.queries(x, qr, jnp.arange(x.shape[1]))
        return q, keys, w

    def extend(self, x: jnp.ndarray, qr: jnp.ndarray, state: dict, start: jnp.ndarray, n_valid: jnp.ndarray):
        keys, state = self.compressor.extend(x, state, start, n_valid)
        q, w = self.queries(x, qr, start[:, None] + jnp.arange(x.shape[1]))
        return q, keys, w, state
