"""KV compressor (spec 3.3): ``ratio`` tokens -> one entry, per-channel softmax pooling.

HCA (``overlap=False``): entry i pools the tokens of block i.
CSA (``overlap=True``): each token projects to ``2*c``; its first ``c`` dims feed the NEXT block's
entry, its last ``c`` dims its OWN block's entry, so entry i pools 2*ratio slots (block i-1's first
halves and block i's second halves). Then a weighted RMSNorm and RoPE at position ``i*ratio``.
Blocks are aligned to the sequence start; the tail of fewer than ``ratio`` tokens is dropped.

Packed documents (``segment_ids``, training only): an entry belongs to the document of its block's
last token; slots holding tokens of another document get gate -inf (like entry 0's missing
previous block), so no entry mixes documents, and queries only see entries of their own document
(``visible_entries(..., segment_ids, entry_segments)``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.config import CompressorSpec, RopeSpec
from v4jax.layers.linear import Linear, param_with_axes
from v4jax.layers.norms import RMSNorm
from v4jax.layers.rope import apply_rope


def entry_segments(segment_ids: jnp.ndarray, ratio: int) -> jnp.ndarray:
    """Document of each complete block's entry: the segment of its last token. ``[B, T] -> [B, T // ratio]``."""
    n = segment_ids.shape[1] // ratio
    return segment_ids[:, ratio - 1: n * ratio: ratio]


def pool_blocks(kv: jnp.ndarray, gate: jnp.ndarray, ratio: int, overlap: bool,
                segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Pool complete blocks. kv, gate: ``[B, T, (1+overlap)*c]`` fp32 (gate already includes ``ape``
    broadcast per position-in-block). Returns ``[B, T // ratio, c]`` (before norm and RoPE).
    With ``segment_ids [B, T]``, slots from another document than the entry's get gate -inf."""
    B, T, w = kv.shape
    n = T // ratio
    kv = kv[:, : n * ratio].reshape(B, n, ratio, w)
    gate = gate[:, : n * ratio].reshape(B, n, ratio, w)
    if overlap:
        c = w // 2
        prev_kv, cur_kv = kv[..., :c], kv[..., c:]
        prev_g, cur_g = gate[..., :c], gate[..., c:]
        # slot group 0 of entry i holds block i-1's first halves; entry 0 has none (weight 0).
        prev_kv = jnp.pad(prev_kv, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :n]
        prev_g = jnp.pad(prev_g, ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)[:, :n]
        kv = jnp.concatenate([prev_kv, cur_kv], axis=2)
        gate = jnp.concatenate([prev_g, cur_g], axis=2)
    if segment_ids is not None:
        seg = segment_ids[:, : n * ratio].reshape(B, n, ratio)
        if overlap:   # the slots of entry i: block i-1's tokens, then block i's
            seg = jnp.concatenate([jnp.pad(seg, ((0, 0), (1, 0), (0, 0)), constant_values=-1)[:, :n], seg], axis=2)
        own = entry_segments(segment_ids, ratio)[..., None]                      # [B, n, 1]
        gate = jnp.where((seg == own)[..., None], gate, -jnp.inf)
    weights = jax.nn.softmax(gate, axis=2)
    return jnp.sum(weights * kv, axis=2)


def add_position_bias(gate: jnp.ndarray, ape: jnp.ndarray, start=0) -> jnp.ndarray:
    """``gate[b, t] + ape[(start[b] + t) % ratio]``; gate ``[B, T, w]``, ape ``[ratio, w]``,
    start a scalar or ``[B]``."""
    T = gate.shape[1]
    idx = (jnp.asarray(start)[..., None] + jnp.arange(T)) % ape.shape[0]
    bias = ape[idx].astype(gate.dtype)
    return gate + (bias if bias.ndim == 3 else bias[None])


class Compressor(nn.Module):
    """Parameters (official names): ``wkv``, ``wgate`` ``[d, (1+o)c]``, ``ape`` ``[ratio, (1+o)c]``,
    ``norm`` ``[c]``. Input ``x [B, T, d]``; output entries ``[B, T // ratio, c]`` (fp32) with RoPE."""

    spec: CompressorSpec
    rope: RopeSpec
    param_dtype: jnp.dtype = jnp.float32

    @nn.nowrap
    def project(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Per-token (kv, gate-logits) in fp32: ``[B, T, (1+o)c]`` each (gate without ``ape``)."""
        s = self.spec
        width = (2 if s.overlap else 1) * s.out_dim
        xf = x.astype(jnp.float32)
        kv = Linear(width, ("embed", "kv"), jnp.float32, self.param_dtype, name="wkv")(xf)
        gate = Linear(width, ("embed", "kv"), jnp.float32, self.param_dtype, name="wgate")(xf)
        return kv, gate

    @nn.nowrap
    def ape(self) -> jnp.ndarray:
        s = self.spec
        width = (2 if s.overlap else 1) * s.out_dim
        return param_with_axes(self, "ape", nn.initializers.zeros, (s.ratio, width), (None, "kv"))

    @nn.nowrap
    def finish(self, pooled: jnp.ndarray, entry_positions: jnp.ndarray) -> jnp.ndarray:
        """Norm then RoPE at each entry's first-token position."""
        c = RMSNorm(self.spec.out_dim, self.spec.norm_eps, name="norm")(pooled)
        return apply_rope(c, entry_positions, self.rope)

    @nn.compact
    def __call__(self, x: jnp.ndarray, state: dict | None = None, start: jnp.ndarray | None = None,
                 n_valid: jnp.ndarray | None = None, segment_ids: jnp.ndarray | None = None):
        """Whole sequence: entries ``[B, T // ratio, c]`` (``segment_ids [B, T]``: packed documents,
        see the module docstring). With ``state`` (a cache, see ``v4jax.inference.cache``) and the
        chunk's first position ``start``: (all entries, new state)."""
        s = self.spec
        kv, gate = self.project(x)
        if state is not None:
            from v4jax.inference.cache import compressor_step

            gate = add_position_bias(gate, self.ape(), start)
            return compressor_step(kv, gate, state, start, s.ratio, s.overlap, self.finish, n_valid)
        gate = add_position_bias(gate, self.ape())
        pooled = pool_blocks(kv, gate, s.ratio, s.overlap, segment_ids)
        n = pooled.shape[1]
        return self.finish(pooled, jnp.arange(n) * s.ratio)


def visible_entries(positions: jnp.ndarray, n_entries: int, ratio: int,
                    segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Causality rule (spec 3.3.6): query at position t may use entry i iff ``i < (t+1) // ratio``.
    positions ``[..., T]`` -> bool ``[..., T, n_entries]``. With ``segment_ids [B, T]`` (packed
    documents) also ``entry_segments(...)[i] == segment_ids[t]`` -> ``[B, T, n_entries]``."""
    vis = jnp.arange(n_entries) < ((positions + 1) // ratio)[..., None]
    if segment_ids is None:
        return vis
    ent = entry_segments(segment_ids, ratio)[:, :n_entries]
    return vis & (segment_ids[:, :, None] == ent[:, None, :])
