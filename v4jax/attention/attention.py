"""The hybrid attention layer (spec 3.1-3.6, 3.9): low-rank query with per-head unweighted norm,
shared K=V single head, sliding window, optional compressor (HCA/CSA) and lightning indexer (CSA),
one softmax with a per-head sink, output de-rotation, grouped low-rank output projection.

Input ``x [B, T, d]`` (the mHC-collapsed, ``attn_norm``-ed stream) -> ``[B, T, d]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.attention.compressor import Compressor, visible_entries
from v4jax.attention.core import attention_reference, topk_to_mask, window_mask
from v4jax.attention.indexer import Indexer
from v4jax.attention.indexer_loss import attention_mass, indexer_kl
from v4jax.config import AttentionSpec
from v4jax.layers.linear import Linear, param_with_axes
from v4jax.layers.norms import RMSNorm, rms_normalize
from v4jax.layers.rope import apply_rope


class Attention(nn.Module):
    """Parameters (official names): ``wq_a``, ``q_norm``, ``wq_b``, ``wkv``, ``kv_norm``, ``wo_a``
    ``[g, n_h*c/g, d_g]``, ``wo_b``, ``attn_sink [n_h]``, and ``compressor`` / ``indexer``."""

    spec: AttentionSpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, return_indexer: bool = False, cache: dict | None = None,
                 start: jnp.ndarray | None = None, n_valid: jnp.ndarray | None = None,
                 segment_ids: jnp.ndarray | None = None, indexer_loss: bool = False,
                 dense_attention: jnp.ndarray | None = None):
        """Whole sequence (``cache=None``), or a chunk at positions ``start + t`` against a layer
        cache (``v4jax.inference.cache``), returning ``(out, new_cache)``.

        Training options (whole sequence only): ``segment_ids [B, T]`` packed documents (no window
        key, compressed entry or compression block crosses a document; 0 = padding);
        ``indexer_loss`` (CSA layers) feeds the indexer detached inputs and returns ``(out, aux)``
        with ``aux["indexer_kl"]``/``aux["indexer_count"]``, the KL summed over counted queries
        (``v4jax.attention.indexer_loss``) over the entries this layer attended to.
        ``dense_attention`` (a traced bool) overrides the config's ``dense_compressed`` so one
        compiled training step serves every curriculum stage."""
        s = self.spec
        B, T, _ = x.shape
        H, c = s.n_heads, s.head_dim
        pos = jnp.arange(T) if cache is None else start[:, None] + jnp.arange(T)
        lin = lambda f, axes, name: Linear(f, axes, self.dtype, self.param_dtype, name=name)

        # 3.1 query path
        qr = RMSNorm(s.q_lora_rank, s.norm_eps, name="q_norm")(lin(s.q_lora_rank, ("embed", "q_lora"), "wq_a")(x))
        q = lin(H * c, ("q_lora", "heads"), "wq_b")(qr).reshape(B, T, H, c)
        q = rms_normalize(q, s.norm_eps).astype(self.dtype)
        q = apply_rope(q, pos, s.rope)
        # 3.2 shared K=V window entries
        kv = RMSNorm(c, s.norm_eps, name="kv_norm")(lin(c, ("embed", "kv"), "wkv")(x))
        kv = apply_rope(kv, pos, s.rope)

        sink = param_with_axes(self, "attn_sink", nn.initializers.zeros, (H,), ("heads_only",))
        comp = comp_mask = kv_mask = None
        aux = {}
        new_cache = {}
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed documents) are for whole-sequence training, not the cache")
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            kv_mask = window_mask(pos, pos, s.window)[None] & same
        if cache is not None:
            from v4jax.inference.cache import window_step

            kv, kv_mask, new_cache["window"] = window_step(cache["window"], kv, start, s.window, n_valid)
        if s.compressor is not None:
            compressor = Compressor(s.compressor, s.rope, self.param_dtype, name="compressor")
            if cache is None:
                comp = compressor(x, segment_ids=segment_ids)
            else:
                comp, new_cache["compressor"] = compressor(x, cache["compressor"], start, n_valid)
            n = comp.shape[1]
            vis = visible_entries(pos, n, s.compressor.ratio, segment_ids)
            comp_mask = jnp.broadcast_to(vis if vis.ndim == 3 else vis[None], (B, T, n))
            if s.indexer is not None:
                indexer = Indexer(s.indexer, s.rope, self.dtype, self.param_dtype, impl=s.impl, name="indexer")
                if cache is None:
                    xi, qi = (jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)) if indexer_loss else (x, qr)
                    idx, scores = indexer(xi, qi, return_scores=True, segment_ids=segment_ids)
                else:
                    idx, scores, new_cache["indexer"] = indexer(x, qr, True, cache["indexer"], start, n_valid)
                aux = {"topk": idx, "index_scores": scores}
                if dense_attention is not None:
                    comp_mask = jnp.where(dense_attention, comp_mask, comp_mask & topk_to_mask(idx, n))
                elif not s.dense_compressed:
                    comp_mask = comp_mask & topk_to_mask(idx, n)
            comp = comp.astype(self.dtype)

        want_kl = indexer_loss and s.indexer is not None and cache is None
        if s.impl == "pallas" and cache is None:
            o, lse = _pallas_core(s, q, kv, sink, comp, aux.get("topk"), segment_ids, dense_attention)
        else:   # the oracle (and the cached path: ring-buffer key masks are not a kernel input)
            o, lse = attention_reference(q, kv, sink, s.window, comp, comp_mask, kv_mask=kv_mask, return_lse=True)
        if want_kl:
            mass = attention_mass(q, comp, lse, comp_mask, c ** -0.5)
            qmask = None if segment_ids is None else segment_ids > 0
            aux["indexer_kl"], aux["indexer_count"] = indexer_kl(mass, aux["index_scores"], comp_mask, qmask)
        o = apply_rope(o, pos, s.rope, inverse=True).astype(self.dtype)

        # 3.6 grouped low-rank output projection
        g = s.o_groups
        o = o.reshape(B, T, g, H * c // g)
        wo_a = param_with_axes(self, "wo_a", nn.initializers.normal(0.02), (g, H * c // g, s.o_lora_rank),
                               ("o_groups", "heads", "o_lora"), self.param_dtype)
        u = jnp.einsum("btgi,gio->btgo", o, wo_a.astype(self.dtype)).astype(self.dtype)
        out = lin(s.dim, ("o_lora", "embed"), "wo_b")(u.reshape(B, T, g * s.o_lora_rank))
        if cache is not None:
            return (out, new_cache, aux) if return_indexer else (out, new_cache)
        if return_indexer or indexer_loss or segment_ids is not None:
            return out, aux
        return out


def _pallas_core(s: AttentionSpec, q, kv, sink, comp, topk, segment_ids, dense_attention):
    """The same core attention through ``kernels_pallas`` (whole sequence): window-only and HCA
    layers and dense-stage CSA use ``compressed_attention``; sparse CSA uses ``sparse_attention``
    with the indexer's top-k lists. Returns (out fp32 ``[B,T,H,c]``, lse ``[B,T,H]``)."""
    import kernels_pallas as kp

    from v4jax.attention.compressor import entry_segments

    if s.compressor is None:
        return kp.compressed_attention(q, kv, sink, None, ratio=1, window=s.window, segment_ids=segment_ids,
                                       return_lse=True)
    ratio = s.compressor.ratio
    cseg = None if segment_ids is None else entry_segments(segment_ids, ratio)[:, :comp.shape[1]]

    def dense(_=None):
        return kp.compressed_attention(q, kv, sink, comp, ratio=ratio, window=s.window, segment_ids=segment_ids,
                                       comp_segment_ids=cseg, return_lse=True)

    def sparse(_=None):
        return kp.sparse_attention(q, kv, sink, comp, topk, window=s.window, segment_ids=segment_ids,
                                   return_lse=True)

    if s.indexer is None:
        return dense()
    if dense_attention is not None:
        return jax.lax.cond(dense_attention, dense, sparse, None)
    return dense() if s.dense_compressed else sparse()
