"""The hybrid attention layer (spec 3.1-3.6, 3.9): low-rank query with per-head unweighted norm,
shared K=V single head, sliding window, optional compressor (HCA/CSA) and lightning indexer (CSA),
one softmax with a per-head sink, output de-rotation, grouped low-rank output projection.

Two entry points, one typed return each:

* ``__call__(x, ctx)``: a whole sequence ``x [B, T, d]`` (the mHC-collapsed, ``attn_norm``-ed
  stream) -> ``(out [B, T, d], IndexerStats)``. ``ctx`` (``SeqContext``) carries the packed
  documents, the dense-stage flag and whether to compute the indexer KL.
* ``extend(x, cache, start, n_valid)``: a chunk at positions ``start[b] + t`` against this layer's
  cache (``init_attention_cache``; only the first ``n_valid[b]`` tokens are real)
  -> ``(out [B, T, d], new cache)``.

The core attention and the indexer's selection go through ``v4jax.attention.backend``, chosen by
``Runtime.attention``; the cache update rules (``window_step`` here, ``compressor_step`` in
``compressor.py``) live beside the state they update.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.attention import backend, kv_format
from v4jax.attention.compressor import (
    Compressor,
    init_compressor_state,
    visible_entries,
)
from v4jax.attention.context import IndexerStats, SeqContext
from v4jax.attention.indexer import Indexer
from v4jax.config import AttentionSpec
from v4jax.layers.linear import Linear, param_with_axes, weight_param
from v4jax.layers.norms import RMSNorm, rms_normalize
from v4jax.layers.quantized import dequantize, qat_format
from v4jax.layers.rope import apply_rope
from v4jax.runtime import Runtime
from v4jax.sharding import constrain


class Attention(nn.Module):
    """Parameters (official names): ``wq_a``, ``q_norm``, ``wq_b``, ``wkv``, ``kv_norm``, ``wo_a``
    ``[g, n_h*c/g, d_g]``, ``wo_b``, ``attn_sink [n_h]``, and ``compressor`` / ``indexer``."""

    spec: AttentionSpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime()

    def setup(self):
        s = self.spec
        H, c, g = s.n_heads, s.head_dim, s.o_groups
        fq = qat_format(s.qat, "fp8")     # the projections are FP8 linears in the checkpoint (spec 8)
        lin = lambda f, axes: Linear(f, axes, self.dtype, self.param_dtype, fake_quant=fq)
        self.wq_a = lin(s.q_lora_rank, ("embed", "q_lora"))
        self.q_norm = RMSNorm(s.q_lora_rank, s.norm_eps)
        self.wq_b = lin(H * c, ("q_lora", "heads"))
        self.wkv = lin(c, ("embed", "kv"))
        self.kv_norm = RMSNorm(c, s.norm_eps)
        self.attn_sink = param_with_axes(self, "attn_sink", nn.initializers.zeros, (H,), ("heads_only",))
        self.wo_a = weight_param(self, "wo_a", nn.initializers.normal(0.02), (g, H * c // g, s.o_lora_rank),
                                 ("o_groups", "heads", "o_lora"), self.param_dtype, fake_quant=fq,
                                 layout="wo_a", groups=g)
        self.wo_b = lin(s.dim, ("o_lora", "embed"))
        if s.compressor is not None:
            self.compressor = Compressor(s.compressor, s.rope, self.param_dtype)
        if s.indexer is not None:
            self.indexer = Indexer(s.indexer, s.rope, self.dtype, self.param_dtype)

    # -- shared pieces ------------------------------------------------------------------------
    def _project(self, x, pos):
        """3.1 query path and 3.2 shared K=V entries: (q latent ``[B,T,d_c]``, q ``[B,T,H,c]``, kv ``[B,T,c]``)."""
        s = self.spec
        B, T, _ = x.shape
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).reshape(B, T, s.n_heads, s.head_dim)
        q = apply_rope(rms_normalize(q, s.norm_eps).astype(self.dtype), pos, s.rope)
        kv = apply_rope(self.kv_norm(self.wkv(x)), pos, s.rope)
        return qr, q, kv

    def _output(self, o, pos):
        """3.5 de-rotation and 3.6 grouped low-rank output: ``[B,T,H,c]`` -> ``[B,T,d]``."""
        s = self.spec
        B, T = o.shape[:2]
        o = apply_rope(o, pos, s.rope, inverse=True).astype(self.dtype)
        g = s.o_groups
        o = o.reshape(B, T, g, s.n_heads * s.head_dim // g)
        u = jnp.einsum("btgi,gio->btgo", o, dequantize(self.wo_a, self.dtype)).astype(self.dtype)
        # pinned to the batch split (d whole, as the residual add wants it): left to propagation,
        # XLA's SPMD partitioner can permute this output's batch blocks and not undo it when the
        # groups and wo_b's rows are on "tensor" (experiments/repro/spmd_batch_permute.py)
        return constrain(self.wo_b(u.reshape(B, T, g * s.o_lora_rank)), ("batch", "act_seq", "act_embed"))

    # -- whole sequence -----------------------------------------------------------------------
    def __call__(self, x: jnp.ndarray, ctx: SeqContext = SeqContext()) -> tuple[jnp.ndarray, IndexerStats]:
        s, impl = self.spec, self.runtime.attention
        pos = jnp.arange(x.shape[1])
        qr, q, kv = self._project(x, pos)
        seg = ctx.segment_ids
        comp = topk = None
        stats = IndexerStats.zero()
        if s.compressor is not None:
            comp = self.compressor(x, segment_ids=seg).astype(self.dtype)
        if s.indexer is not None:
            # with the indexer loss the indexer trains on detached inputs (techniques 3.4)
            xi, qi = (jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)) if ctx.indexer_loss else (x, qr)
            iq, ikeys, iw = self.indexer(xi, qi, segment_ids=seg)
            if ctx.dense_attention is not True or ctx.indexer_loss:
                topk = backend.select(impl, iq, ikeys, iw, s.indexer.topk, s.compressor.ratio, seg,
                                      self.runtime.index_select)
        o, lse = backend.attend(impl, s, q, kv, self.attn_sink, comp, topk, ctx, self.runtime.q_chunk)
        if s.indexer is not None and ctx.indexer_loss:
            stats = backend.indexer_kl(impl, s, q, comp, lse, iq, ikeys, iw, topk, ctx, self.runtime.q_chunk)
        return self._output(o, pos), stats

    # -- cached chunk (prefill chunk or decode step) --------------------------------------------
    def extend(self, x: jnp.ndarray, cache: dict, start: jnp.ndarray, n_valid: jnp.ndarray):
        s, impl = self.spec, self.runtime.attention
        T = x.shape[1]
        pos = start[:, None] + jnp.arange(T)
        qr, q, kv = self._project(x, pos)
        new = {}
        keys, key_mask, new["window"] = window_step(cache["window"], kv, start, s.window, n_valid)
        comp = visible = topk = None
        if s.compressor is not None:
            comp, new["compressor"] = self.compressor.extend(x, cache["compressor"], start, n_valid)
            comp = comp.astype(self.dtype)
            visible = visible_entries(pos, comp.shape[1], s.compressor.ratio)
        if s.indexer is not None:
            iq, ikeys, iw, new["indexer"] = self.indexer.extend(x, qr, cache["indexer"], start, n_valid)
            topk = backend.select_cached(iq, ikeys, iw, s.indexer.topk, visible)
        o, _ = backend.attend_cached(impl, q, keys, key_mask, self.attn_sink, comp, visible, topk)
        return self._output(o, pos), new


def init_attention_cache(spec: AttentionSpec, batch: int, max_len: int, dtype, fmt: str = "native") -> dict:
    """This layer's cache (spec 3.8): ``window [B, W, c]``, a ring buffer (slot ``p % W`` holds
    position ``p``); HCA / CSA: the main ``compressor`` state; CSA: the ``indexer``'s key
    compressor state (``init_compressor_state``). ``fmt``: storage of the cached entries
    (``kv_format``: ``"native"`` or ``"fp8"``)."""
    r_dim = spec.rope.rope_dim
    c = {"window": kv_format.empty((batch, spec.window, spec.head_dim), dtype, fmt, r_dim)}
    if spec.compressor is not None:
        c["compressor"] = init_compressor_state(spec.compressor, batch, max_len, dtype, fmt, r_dim)
    if spec.indexer is not None:
        c["indexer"] = init_compressor_state(spec.indexer.compressor, batch, max_len, dtype, fmt, 0, "index")
    return c


def window_step(ring, kv: jnp.ndarray, start: jnp.ndarray, window: int, n_valid: jnp.ndarray):
    """The window ring's update rule: keys for a chunk ``[ring | chunk]`` with their sliding-window
    mask, and the new ring.

    ring ``[B, W, c]`` (positions < start), kv ``[B, T, c]`` at positions ``start[b] + t``;
    only the first ``n_valid[b]`` chunk tokens are real (right padding). Returns keys
    ``[B, W+T, c]``, mask ``[B, T, W+T]`` and the updated ring."""
    T = kv.shape[1]

    def one(ring, kv, start, n_valid):
        slot = jnp.arange(window)
        ring_pos = start - 1 - jnp.mod(start - 1 - slot, window)
        q_pos = start + jnp.arange(T)
        k_pos = jnp.concatenate([ring_pos, q_pos])
        k_ok = jnp.concatenate([ring_pos >= 0, jnp.ones((T,), bool)])
        d = q_pos[:, None] - k_pos[None, :]
        mask = k_ok[None] & (d >= 0) & (d < window)
        t = jnp.arange(T)
        keep = (t < n_valid) & (q_pos >= start + n_valid - window)  # the last W real tokens
        new_ring = kv_format.store(ring, jnp.where(keep, jnp.mod(q_pos, window), window), kv)
        keys = jnp.concatenate([kv_format.load(ring).astype(kv.dtype), kv], axis=0)
        return keys, mask, new_ring

    return jax.vmap(one)(ring, kv, start, n_valid)
