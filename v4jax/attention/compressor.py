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

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.attention import kv_format
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
    ``norm`` ``[c]``.

    ``__call__(x, segment_ids=None)``: whole sequence ``x [B, T, d]`` -> entries ``[B, T // ratio, c]``
    (fp32, normed, RoPE at each entry's first position).
    ``extend(x, state, start, n_valid)``: a chunk at positions ``start[b] + t`` against a cached
    state (``init_state``) -> (every cached entry ``[B, max_len // ratio, c]``, new state)."""

    spec: CompressorSpec
    rope: RopeSpec
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        s = self.spec
        width = (2 if s.overlap else 1) * s.out_dim
        self.wkv = Linear(width, ("embed", "kv"), jnp.float32, self.param_dtype)
        self.wgate = Linear(width, ("embed", "kv"), jnp.float32, self.param_dtype)
        self.ape = param_with_axes(self, "ape", nn.initializers.zeros, (s.ratio, width), (None, "kv"))
        self.norm = RMSNorm(s.out_dim, s.norm_eps)

    def project(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Per-token (kv, gate-logits) in fp32: ``[B, T, (1+o)c]`` each (gate without ``ape``)."""
        xf = x.astype(jnp.float32)
        return self.wkv(xf), self.wgate(xf)

    def finish(self, pooled: jnp.ndarray, entry_positions: jnp.ndarray) -> jnp.ndarray:
        """Norm then RoPE at each entry's first-token position."""
        return apply_rope(self.norm(pooled), entry_positions, self.rope)

    def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
        s = self.spec
        kv, gate = self.project(x)
        gate = add_position_bias(gate, self.ape)
        pooled = pool_blocks(kv, gate, s.ratio, s.overlap, segment_ids)
        return self.finish(pooled, jnp.arange(pooled.shape[1]) * s.ratio)

    def extend(self, x: jnp.ndarray, state: dict, start: jnp.ndarray, n_valid: jnp.ndarray):
        s = self.spec
        kv, gate = self.project(x)
        gate = add_position_bias(gate, self.ape, start)
        return compressor_step(kv, gate, state, start, s.ratio, s.overlap, self.finish, n_valid)


def init_compressor_state(spec: CompressorSpec, batch: int, max_len: int, dtype, fmt: str = "native",
                          rope_dim: int = 0, kind: str = "main") -> dict:
    """The cached state of one compressor (spec 3.8), ``w = (1 + overlap) * c``:
    ``kv``, ``gate [B, R, w]`` (fp32): a ring of the last ``R`` positions' projections and
    ``gate + ape``, row ``p % R`` holding position ``p``, with ``R = ratio`` (HCA: the block being
    filled) or ``2 * ratio`` (CSA: also the last complete block, whose first halves feed the next
    entry); ``entries [B, max_len // ratio, c]`` (stored as ``fmt``, see ``kv_format``).

    The state is a function of the rows and the position counter only (nothing is shifted when
    a block completes), so moving a sequence's position back (speculative decoding's rollback)
    is exact: rows of positions past the new counter are never read before they are rewritten,
    and an entry is visible only to queries past its block (``visible_entries``)."""
    r, w = spec.ratio, (2 if spec.overlap else 1) * spec.out_dim
    R = (2 if spec.overlap else 1) * r
    return {"kv": jnp.zeros((batch, R, w), jnp.float32),
            "gate": jnp.zeros((batch, R, w), jnp.float32),
            "entries": kv_format.empty((batch, max_len // r, spec.out_dim), dtype, fmt, rope_dim, kind)}


def compressor_step(kv: jnp.ndarray, gate: jnp.ndarray, state: dict, start: jnp.ndarray, ratio: int,
                    overlap: bool, finish: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                    n_valid: jnp.ndarray):
    """The cache update rule: feed a chunk's projections into a compressor state; emit every block
    it completes.

    kv, gate ``[B, T, w]`` fp32 (gate already includes ``ape``); ``start``, ``n_valid`` ``[B]``
    (only the first ``n_valid[b]`` chunk tokens are real). ``finish(pooled, positions)`` applies
    the norm and RoPE (batched). Returns (all entries ``[B, N, c]``, new state)."""
    B, T, w = kv.shape
    r = ratio
    R = state["kv"].shape[1]                      # ring rows: r (HCA) or 2r (CSA)
    L = r + T
    nb = L // r

    def pool(kv, gate, st, start, n_valid):
        off = jnp.mod(start, r)
        bs = start - off                          # first position of the block being filled
        j = jnp.arange(L)
        from_state = (j < off)[:, None]
        rows, cols = jnp.mod(bs + j, R), jnp.clip(j - off, 0, T - 1)
        comb_kv = jnp.where(from_state, st["kv"][rows], kv[cols])
        comb_g = jnp.where(from_state, st["gate"][rows], gate[cols])
        blk_kv = comb_kv[: nb * r].reshape(nb, r, w)
        blk_g = comb_g[: nb * r].reshape(nb, r, w)
        if overlap:
            c = w // 2
            prev_rows = jnp.mod(bs - r + jnp.arange(r), R)      # the previous block, still in the ring
            first_kv = st["kv"][prev_rows]
            first_g = jnp.where(bs >= r, st["gate"][prev_rows], -jnp.inf)   # entry 0 has no previous block
            prev_kv = jnp.concatenate([first_kv[None], blk_kv[:-1]], axis=0)
            prev_g = jnp.concatenate([first_g[None], blk_g[:-1]], axis=0)
            slot_kv = jnp.concatenate([prev_kv[..., :c], blk_kv[..., c:]], axis=1)
            slot_g = jnp.concatenate([prev_g[..., :c], blk_g[..., c:]], axis=1)
        else:
            slot_kv, slot_g = blk_kv, blk_g
        pooled = jnp.sum(jax.nn.softmax(slot_g, axis=1) * slot_kv, axis=1)
        e_idx = bs // r + jnp.arange(nb)
        done = (jnp.arange(nb) + 1) * r <= off + n_valid
        # the ring after the chunk: slot s holds the newest real position p = s (mod R)
        last = start + n_valid - 1
        slot = jnp.arange(R)
        p_new = last - jnp.mod(last - slot, R)
        take = ((p_new >= start) & (n_valid > 0))[:, None]
        col = jnp.clip(p_new - start, 0, T - 1)
        new = {"kv": jnp.where(take, kv[col], st["kv"]), "gate": jnp.where(take, gate[col], st["gate"])}
        return pooled, e_idx, done, new

    small = {k: v for k, v in state.items() if k != "entries"}
    pooled, e_idx, done, new = jax.vmap(pool)(kv, gate, small, start, n_valid)
    entries_new = finish(pooled, e_idx * r)
    n_max = jax.tree.leaves(state["entries"])[0].shape[1]
    dest = jnp.where(done, e_idx, n_max)
    new["entries"] = jax.vmap(kv_format.store)(state["entries"], dest, entries_new)
    return kv_format.load(new["entries"]), new


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
