"""Per-layer KV caches as one fixed-shape pytree (spec 3.8), and the pure update rules.

Layout for ``batch`` sequences, each with its own position counter ``pos[b]`` (tokens seen so far):

* every layer: ``window [B, W, c]``, a ring buffer; slot ``p % W`` holds position ``p``.
* HCA / CSA: ``compressor``: ``kv``, ``gate [B, r, w]`` (fp32; projections and ``gate + ape`` of
  the block being filled, row ``p % r``), ``entries [B, max_len // r, c]``; CSA also ``prev_kv``,
  ``prev_gate [B, r, w]``: the last complete block's projections, whose first halves feed the
  next entry (``prev_gate`` starts at -inf: entry 0 has no previous block).
* CSA: ``indexer``: the same compressor state at width ``c_I`` (the indexer keys).

``w = (1 + overlap) * c``. Shapes never change, so a jitted step compiles once per chunk length.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from v4jax.config import V4Config
from v4jax.inference import kv_format


def _compressor_state(batch, max_len, ratio, out_dim, overlap, dtype, fmt="native", rope_dim=0, kind="main"):
    w = (2 if overlap else 1) * out_dim
    st = {"kv": jnp.zeros((batch, ratio, w), jnp.float32),
          "gate": jnp.zeros((batch, ratio, w), jnp.float32),
          "entries": kv_format.empty((batch, max_len // ratio, out_dim), dtype, fmt, rope_dim, kind)}
    if overlap:
        st["prev_kv"] = jnp.zeros((batch, ratio, w), jnp.float32)
        st["prev_gate"] = jnp.full((batch, ratio, w), -jnp.inf, jnp.float32)
    return st


def init_cache(cfg: V4Config, batch: int, max_len: int, dtype=jnp.float32, fmt: str = "native") -> dict:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens. ``fmt`` is the storage
    of the cached entries: ``"native"`` (``dtype``) or ``"fp8"`` (see ``kv_format``)."""
    if max_len < 1 or max_len > cfg.max_seq_len:
        raise ValueError(f"max_len must be in [1, {cfg.max_seq_len}], got {max_len}")
    if fmt not in ("native", "fp8"):
        raise ValueError(f"cache format must be 'native' or 'fp8', got {fmt!r}")
    layers = []
    r_dim = cfg.rope_head_dim
    for lt in cfg.layer_types:
        c = {"window": kv_format.empty((batch, cfg.window_size, cfg.head_dim), dtype, fmt, r_dim)}
        if lt != "window":
            r = cfg.ratio(lt)
            c["compressor"] = _compressor_state(batch, max_len, r, cfg.head_dim, lt == "csa", dtype, fmt, r_dim)
        if lt == "csa":
            c["indexer"] = _compressor_state(batch, max_len, cfg.csa_ratio, cfg.index_head_dim, True, dtype, fmt, 0,
                                            "index")
        layers.append(c)
    return {"pos": jnp.zeros((batch,), jnp.int32), "max_len": jnp.asarray(max_len, jnp.int32), "layers": layers}


def window_step(ring, kv: jnp.ndarray, start: jnp.ndarray, window: int, n_valid: jnp.ndarray):
    """Keys for a chunk: ``[ring | chunk]`` with their sliding-window mask, and the new ring.

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


def compressor_step(kv: jnp.ndarray, gate: jnp.ndarray, state: dict, start: jnp.ndarray, ratio: int,
                    overlap: bool, finish: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                    n_valid: jnp.ndarray):
    """Feed a chunk's projections into a compressor state; emit every block it completes.

    kv, gate ``[B, T, w]`` fp32 (gate already includes ``ape``); ``start``, ``n_valid`` ``[B]``.
    ``finish(pooled, positions)`` applies the norm and RoPE (batched). Returns (all entries
    ``[B, N, c]``, new state)."""
    B, T, w = kv.shape
    r = ratio
    L = r + T
    nb = L // r

    def pool(kv, gate, st, start, n_valid):
        off = jnp.mod(start, r)
        j = jnp.arange(L)
        from_state = (j < off)[:, None]
        rows, cols = jnp.clip(j, 0, r - 1), jnp.clip(j - off, 0, T - 1)
        comb_kv = jnp.where(from_state, st["kv"][rows], kv[cols])
        comb_g = jnp.where(from_state, st["gate"][rows], gate[cols])
        blk_kv = comb_kv[: nb * r].reshape(nb, r, w)
        blk_g = comb_g[: nb * r].reshape(nb, r, w)
        if overlap:
            c = w // 2
            prev_kv = jnp.concatenate([st["prev_kv"][None], blk_kv[:-1]], axis=0)
            prev_g = jnp.concatenate([st["prev_gate"][None], blk_g[:-1]], axis=0)
            slot_kv = jnp.concatenate([prev_kv[..., :c], blk_kv[..., c:]], axis=1)
            slot_g = jnp.concatenate([prev_g[..., :c], blk_g[..., c:]], axis=1)
        else:
            slot_kv, slot_g = blk_kv, blk_g
        pooled = jnp.sum(jax.nn.softmax(slot_g, axis=1) * slot_kv, axis=1)
        e_idx = (start - off) // r + jnp.arange(nb)
        done = (jnp.arange(nb) + 1) * r <= off + n_valid
        n_done = (off + n_valid) // r
        new = {}
        comb_kv, comb_g = jnp.pad(comb_kv, ((0, r), (0, 0))), jnp.pad(comb_g, ((0, r), (0, 0)))
        new["kv"] = jax.lax.dynamic_slice_in_dim(comb_kv, n_done * r, r, axis=0)
        new["gate"] = jax.lax.dynamic_slice_in_dim(comb_g, n_done * r, r, axis=0)
        if overlap:
            last, has = jnp.maximum(n_done - 1, 0) * r, n_done >= 1
            new["prev_kv"] = jnp.where(has, jax.lax.dynamic_slice_in_dim(comb_kv, last, r, axis=0), st["prev_kv"])
            new["prev_gate"] = jnp.where(has, jax.lax.dynamic_slice_in_dim(comb_g, last, r, axis=0), st["prev_gate"])
        return pooled, e_idx, done, new

    small = {k: v for k, v in state.items() if k != "entries"}
    pooled, e_idx, done, new = jax.vmap(pool)(kv, gate, small, start, n_valid)
    entries_new = finish(pooled, e_idx * r)
    n_max = jax.tree.leaves(state["entries"])[0].shape[1]
    dest = jnp.where(done, e_idx, n_max)
    new["entries"] = jax.vmap(kv_format.store)(state["entries"], dest, entries_new)
    return kv_format.load(new["entries"]), new
