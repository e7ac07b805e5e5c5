"""Portable sub-quadratic core attention and lightning-indexer selection in pure jnp (XLA).

The same functions as the dense oracles (``core.attention_reference`` with ``window_mask`` /
``visible_entries`` / ``topk_to_mask`` masks, ``indexer.select_topk(indexer_scores(...))`` and
``indexer_loss.indexer_kl(attention_mass(...))``), computed so that no ``[T, T]`` and no ``[T, N]``
array (not even a mask) ever exists. Everything runs in fp32 (inputs may be bf16).

* Queries are processed in chunks of ``q_chunk`` tokens (``lax.scan`` over chunks, T padded up to a
  multiple of the chunk).
* Sliding window (spec 3.2, 3.5): banded attention. Query chunk ``[s, s+C)`` reads the keys
  ``[s-window+1, s+C)`` with ``lax.dynamic_slice`` of a front-padded kv: O(T * (C + window)).
* Sparse CSA (spec 3.4, 3.5): each query's top-k entries are gathered from ``comp``: O(T * k).
* HCA / dense-stage CSA (spec 3.3.6, 3.5): blockwise over the entries with an online softmax
  (``lax.scan`` over blocks of ``comp_block`` entries; a block that no query of the chunk can see
  yet is skipped with ``lax.cond``, so causal HCA does about half the dense work): O(C * comp_block)
  memory per chunk.
* ``attention_xla`` has an explicit flash-attention backward (``jax.custom_vjp``): the forward saves
  only (inputs, out, lse); the backward rematerialises each chunk's probabilities from ``lse`` and
  accumulates dq / dkv / dcomp / dsink chunk by chunk, so training memory is O(T * (C + window))
  (no per-entry-block residuals, which a ``jax.checkpoint``-ed online softmax would save).
* The indexer top-k keeps a running top-k over key blocks (merge = ``lax.top_k`` of [running list,
  new block], running list first, which keeps the oracle's lower-index-wins tie-break exactly).
* The indexer KL scans query chunks with ``jax.checkpoint``-ed bodies (and checkpointed entry
  blocks in the dense stage), gathering only the k selected entries in the sparse stage.

One softmax per query t and head h (spec 3.5): keys s with ``0 <= t-s < window`` (and the same
segment when ``segment_ids`` are given), compressed entries (the listed top-k, or all visible
``i < (t+1)//ratio`` of the same segment), and the sink logit ``sink[h]`` (denominator only).
K = V; the single KV head is shared by all H query heads. ``lse`` is the log of the full denominator.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from v4jax.attention.indexer_loss import indexer_kl

F32 = jnp.float32

# Defaults, measured on CPU (2 cores; H=4, c=64, window 8-128, T=4096). The banded window reads
# C + window - 1 keys per query chunk, so chunks near the window size waste least; below 32 the
# per-chunk overhead dominates, above 128 the band waste (on accelerators 128 already fills the
# matrix units). Entry blocks of 256-512 were equally fast; 256 keeps the per-block scores small.
# Override with ``q_chunk`` / ``comp_block`` / ``key_block`` (``Runtime.q_chunk``).
MIN_Q_CHUNK, MAX_Q_CHUNK = 32, 128
DEFAULT_COMP_BLOCK = 256          # entries per online-softmax block (HCA / dense CSA, indexer KL)
DEFAULT_INDEX_Q_CHUNK = 64        # queries per chunk of the indexer top-k and the indexer KL
# Indexer keys per running top-k merge: as long as memory allows. ``lax.top_k`` dominates the CSA
# layer on CPU and costs much less per element on long rows (k=512: 62 ns/element on rows of 1K,
# 30 on 4K, 12 on 17K), so few long merges beat many short ones; the per-head scores of one merge,
# ``[B, C, n_I, block]`` fp32, are kept under INDEX_SCORE_BUDGET elements.
MAX_KEY_BLOCK = 16384
INDEX_SCORE_BUDGET = 1 << 24
INDEX_PHASES = 4                  # causal phases of the indexer top-k (each reads a static key prefix)


def default_q_chunk(T: int, window: int = 0) -> int:
    """The attention query chunk used when ``q_chunk`` is None: the window clamped to [32, 128],
    at most T."""
    return max(1, min(T, max(MIN_Q_CHUNK, min(int(window), MAX_Q_CHUNK))))


# ----------------------------------------------------------------------------- small helpers
def _pad_axis(x, axis: int, before: int, after: int, value=0):
    if before == 0 and after == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (before, after)
    return jnp.pad(x, pads, constant_values=value)


def _to_chunks(x, C: int, n: int, value=0):
    """``[B, T, ...] -> [n, B, C, ...]`` (T padded at the end to ``n*C`` with ``value``)."""
    B, T = x.shape[:2]
    x = _pad_axis(x, 1, 0, n * C - T, value)
    return jnp.moveaxis(x.reshape((B, n, C) + x.shape[2:]), 1, 0)


def _from_chunks(x, T: int):
    """``[n, B, C, ...] -> [B, T, ...]`` (drops the padding)."""
    n, B, C = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((B, n * C) + x.shape[3:])[:, :T]


def _entry_segments(segment_ids, ratio: int, n: int):
    """As ``compressor.entry_segments``: the segment of each block's last token, ``[B, n]``."""
    return segment_ids[:, ratio - 1: n * ratio: ratio][:, :n]


def _finite(m):
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _gather_rows(table, idx):
    """table ``[B, N, d]``, idx ``[B, C, k]`` (already clipped to [0, N)) -> ``[B, C, k, d]``."""
    return table[jnp.arange(table.shape[0])[:, None, None], idx]


# ----------------------------------------------------------------------------- core attention
class _Plan(NamedTuple):
    T: int
    window: int
    ratio: int
    mode: str          # "none" | "sparse" | "dense"
    chunk: int
    n_chunks: int
    block: int
    n_blocks: int
    n_entries: int
    scale: float
    segmented: bool


class _Ctx(NamedTuple):
    """Per-call arrays shared by all chunks (built identically in the forward and the backward)."""
    kvp: jnp.ndarray | None        # [B, (W-1) + Tp, c] front-padded window keys
    segk: jnp.ndarray | None       # [B, (W-1) + Tp] their segments
    comp: jnp.ndarray | None       # [B, N, c] (sparse)
    cblocks: jnp.ndarray | None    # [nK, B, Kb, c] (dense)
    csegblocks: jnp.ndarray | None  # [nK, B, Kb] (dense, segmented)


def _make_ctx(p: _Plan, kv, comp, seg, cseg) -> _Ctx:
    W, Tp = p.window, p.chunk * p.n_chunks
    kvp = segk = cb = csb = None
    if W > 0:
        kvp = _pad_axis(kv, 1, W - 1, Tp - p.T)
        if p.segmented:
            segk = _pad_axis(seg, 1, W - 1, Tp - p.T, -1)
    if p.mode == "dense":
        cb = _to_chunks(comp, p.block, p.n_blocks)
        if p.segmented:
            csb = _to_chunks(cseg, p.block, p.n_blocks, -2)
    return _Ctx(kvp, segk, comp if p.mode == "sparse" else None, cb, csb)


def _window_part(p: _Plan, ctx: _Ctx, j, qc, segc):
    """Banded window logits of chunk j: (logits ``[B, C, H, L]`` with -inf outside, band ``[B, L, c]``)."""
    C, W = p.chunk, p.window
    L = C + W - 1
    s0 = j * C
    band = lax.dynamic_slice_in_dim(ctx.kvp, s0, L, axis=1)
    qpos = s0 + jnp.arange(C)
    kpos = s0 - (W - 1) + jnp.arange(L)
    d = qpos[:, None] - kpos[None, :]
    mask = ((d >= 0) & (d < W) & (kpos >= 0)[None, :])[None]                   # [1, C, L]
    if p.segmented:
        segb = lax.dynamic_slice_in_dim(ctx.segk, s0, L, axis=1)
        mask = mask & (segc[:, :, None] == segb[:, None, :])
    s = jnp.einsum("bchd,bld->bchl", qc, band) * p.scale
    return jnp.where(mask[:, :, None, :], s, -jnp.inf), band


def _sparse_part(p: _Plan, ctx: _Ctx, qc, topkc):
    """Gathered top-k logits: (logits ``[B, C, H, k]``, entries ``[B, C, k, c]``, ids, valid)."""
    valid = (topkc >= 0) & (topkc < p.n_entries)
    ids = jnp.clip(topkc, 0, p.n_entries - 1)
    g = _gather_rows(ctx.comp, ids)
    s = jnp.einsum("bchd,bckd->bchk", qc, g) * p.scale
    return jnp.where(valid[:, :, None, :], s, -jnp.inf), g, ids, valid


def _dense_part(p: _Plan, j, n, qc, segc, blk, csegblk):
    """Logits of entry block n for chunk j: ``[B, C, H, Kb]``, -inf where not visible."""
    C, Kb = p.chunk, p.block
    qpos = j * C + jnp.arange(C)
    ent = n * Kb + jnp.arange(Kb)
    mask = ((ent[None, :] < ((qpos + 1) // p.ratio)[:, None]) & (ent < p.n_entries)[None, :])[None]
    if p.segmented:
        mask = mask & (segc[:, :, None] == csegblk[:, None, :])
    s = jnp.einsum("bchd,bnd->bchn", qc, blk) * p.scale
    return jnp.where(mask[:, :, None, :], s, -jnp.inf)


def _block_live(ratio: int, j, C: int, n, Kb: int):
    """Whether entry block n (entries ``[n*Kb, (n+1)*Kb)``) is visible to any query of chunk j."""
    return n * Kb < (j * C + C) // ratio


def _merge_parts(parts, sink, shape):
    """One softmax over several key sets plus the sink: ``parts`` are (scores ``[.., H, n]``,
    values, einsum) triples. Returns the running (max ``m``, denominator ``l``, numerator ``acc``)
    of the online softmax, ``shape = (B, C, H, c)``."""
    B, C, H, c = shape
    m = jnp.broadcast_to(sink, (B, C, H))
    for sc, _, _ in parts:
        m = jnp.maximum(m, jnp.max(sc, axis=-1))
    m = _finite(m)
    l = jnp.exp(sink - m)
    acc = jnp.zeros((B, C, H, c), F32)
    for sc, v, eq in parts:
        pr = jnp.exp(sc - m[..., None])
        l = l + jnp.sum(pr, axis=-1)
        acc = acc + jnp.einsum(eq, pr, v)
    return m, l, acc


def _chunk_forward(p: _Plan, ctx: _Ctx, sink, j, qc, segc, topkc):
    """One query chunk: (out ``[B, C, H, c]``, lse ``[B, C, H]``)."""
    B, C, H, c = qc.shape
    parts = []
    if p.window > 0:
        s, band = _window_part(p, ctx, j, qc, segc)
        parts.append((s, band, "bchl,bld->bchd"))
    if p.mode == "sparse":
        s, g, _, _ = _sparse_part(p, ctx, qc, topkc)
        parts.append((s, g, "bchk,bckd->bchd"))
    m, l, acc = _merge_parts(parts, sink, (B, C, H, c))
    if p.mode == "dense":
        def update(carry, xs):
            m, l, acc = carry
            n, blk, csegblk = xs
            s = _dense_part(p, j, n, qc, segc, blk, csegblk)
            m_new = _finite(jnp.maximum(m, jnp.max(s, axis=-1)))
            alpha = jnp.exp(m - m_new)
            pr = jnp.exp(s - m_new[..., None])
            l = l * alpha + jnp.sum(pr, axis=-1)
            acc = acc * alpha[..., None] + jnp.einsum("bchn,bnd->bchd", pr, blk)
            return m_new, l, acc

        def block(carry, xs):   # blocks no query of the chunk can see yet are skipped
            live = _block_live(p.ratio, j, C, xs[0], p.block)
            return lax.cond(live, update, lambda carry, _: carry, carry, xs), None

        cs = ctx.csegblocks if p.segmented else jnp.zeros((p.n_blocks,), jnp.int32)
        (m, l, acc), _ = lax.scan(block, (m, l, acc), (jnp.arange(p.n_blocks), ctx.cblocks, cs))
    l_safe = jnp.where(l > 0, l, 1.0)
    return acc / l_safe[..., None], m + jnp.log(l)


def _chunk_backward(p: _Plan, ctx: _Ctx, sink, j, qc, segc, topkc, outc, lsec, doutc, dlsec):
    """Flash backward of one chunk. Returns (dq chunk, dband | None, (ids, dg) | None,
    dcomp blocks | None, dsink)."""
    lse = _finite(lsec)
    coef = dlsec - jnp.sum(doutc * outc, axis=-1)                               # [B, C, H]

    def pull(s, v, eq_p, eq_q, eq_v):
        pr = jnp.exp(s - lse[..., None])                                       # 0 where masked
        dp = jnp.einsum(eq_p, doutc, v)
        ds = pr * (dp + coef[..., None])
        dq = p.scale * jnp.einsum(eq_q, ds, v)
        dv = p.scale * jnp.einsum(eq_v, ds, qc) + jnp.einsum(eq_v, pr, doutc)
        return dq, dv

    dq = jnp.zeros_like(qc)
    dband = sparse_g = dblocks = None
    if p.window > 0:
        s, band = _window_part(p, ctx, j, qc, segc)
        dqw, dband = pull(s, band, "bchd,bld->bchl", "bchl,bld->bchd", "bchl,bchd->bld")
        dq = dq + dqw
    if p.mode == "sparse":
        s, g, ids, valid = _sparse_part(p, ctx, qc, topkc)
        dqs, dg = pull(s, g, "bchd,bckd->bchk", "bchk,bckd->bchd", "bchk,bchd->bckd")
        dq = dq + dqs
        sparse_g = (ids, jnp.where(valid[..., None], dg, 0.0))
    if p.mode == "dense":
        def update(dq, xs):
            n, blk, csegblk = xs
            s = _dense_part(p, j, n, qc, segc, blk, csegblk)
            dqb, dblk = pull(s, blk, "bchd,bnd->bchn", "bchn,bnd->bchd", "bchn,bchd->bnd")
            return dq + dqb, dblk

        def block(dq, xs):
            live = _block_live(p.ratio, j, p.chunk, xs[0], p.block)
            return lax.cond(live, update, lambda dq, xs: (dq, jnp.zeros_like(xs[1])), dq, xs)

        cs = ctx.csegblocks if p.segmented else jnp.zeros((p.n_blocks,), jnp.int32)
        dq, dblocks = lax.scan(block, dq, (jnp.arange(p.n_blocks), ctx.cblocks, cs))
    dsink = jnp.sum(jnp.exp(sink - lse) * coef, axis=(0, 1))
    return dq, dband, sparse_g, dblocks, dsink


def _chunk_inputs(p: _Plan, q, seg, topk):
    C, n = p.chunk, p.n_chunks
    qch = _to_chunks(q, C, n)
    segch = _to_chunks(seg, C, n, -1) if p.segmented else jnp.zeros((n,), jnp.int32)
    topch = _to_chunks(topk, C, n, -1) if p.mode == "sparse" else jnp.zeros((n,), jnp.int32)
    return qch, segch, topch


def _core_forward(p: _Plan, q, kv, comp, sink, topk, seg, cseg):
    ctx = _make_ctx(p, kv, comp, seg, cseg)
    qch, segch, topch = _chunk_inputs(p, q, seg, topk)

    def body(_, xs):
        j, qc, segc, topkc = xs
        return None, _chunk_forward(p, ctx, sink, j, qc, segc, topkc)

    _, (o, lse) = lax.scan(body, None, (jnp.arange(p.n_chunks), qch, segch, topch))
    return _from_chunks(o, p.T), _from_chunks(lse, p.T)


def _core_fwd(p, q, kv, comp, sink, topk, seg, cseg):
    out, lse = _core_forward(p, q, kv, comp, sink, topk, seg, cseg)
    return (out, lse), (q, kv, comp, sink, topk, seg, cseg, out, lse)


def _core_bwd(p, res, cts):
    q, kv, comp, sink, topk, seg, cseg, out, lse = res
    dout, dlse = cts
    ctx = _make_ctx(p, kv, comp, seg, cseg)
    qch, segch, topch = _chunk_inputs(p, q, seg, topk)
    C, n = p.chunk, p.n_chunks
    och, lch = _to_chunks(out, C, n), _to_chunks(lse, C, n)
    doch, dlch = _to_chunks(dout.astype(F32), C, n), _to_chunks(dlse.astype(F32), C, n)

    carry0 = (jnp.zeros_like(ctx.kvp) if p.window > 0 else None,
              jnp.zeros_like(comp) if p.mode == "sparse" else None,
              jnp.zeros_like(ctx.cblocks) if p.mode == "dense" else None,
              jnp.zeros_like(sink))

    def body(carry, xs):
        dkvp, dcomp, dcb, dsink = carry
        j, qc, segc, topkc, oc, lc, doc, dlc = xs
        dq, dband, sg, dblocks, ds = _chunk_backward(p, ctx, sink, j, qc, segc, topkc, oc, lc, doc, dlc)
        if dband is not None:
            s0 = j * C
            L = dband.shape[1]
            cur = lax.dynamic_slice_in_dim(dkvp, s0, L, axis=1)
            dkvp = lax.dynamic_update_slice_in_dim(dkvp, cur + dband, s0, axis=1)
        if sg is not None:
            ids, dg = sg
            dcomp = dcomp.at[jnp.arange(dg.shape[0])[:, None, None], ids].add(dg)
        if dblocks is not None:
            dcb = dcb + dblocks
        return (dkvp, dcomp, dcb, dsink + ds), dq

    (dkvp, dcomp, dcb, dsink), dqch = lax.scan(
        body, carry0, (jnp.arange(n), qch, segch, topch, och, lch, doch, dlch))
    dq = _from_chunks(dqch, p.T)
    W = p.window
    dkv = dkvp[:, W - 1: W - 1 + p.T] if W > 0 else jnp.zeros_like(kv)
    if comp is None:
        dc = None
    elif p.mode == "sparse":
        dc = dcomp
    elif p.mode == "dense":
        dc = _from_chunks(dcb, p.n_entries)
    else:
        dc = jnp.zeros_like(comp)
    return dq, dkv, dc, dsink, None, None, None


_core = jax.custom_vjp(_core_forward, nondiff_argnums=(0,))
_core.defvjp(_core_fwd, _core_bwd)


def attention_xla(q, kv, sink, *, window: int, comp=None, ratio: int = 1, topk=None, dense=None,
                  segment_ids=None, comp_segment_ids=None, scale: float | None = None,
                  q_chunk: int | None = None, comp_block: int | None = None):
    """Core attention of a whole sequence (spec 3.5, training form of 3.9), chunked and sub-quadratic.

    q ``[B, T, H, c]``, kv ``[B, T, c]`` (window keys = values, position t at row t), sink ``[H]``,
    comp ``[B, N, c]`` or None (N may be 0: window-only). Compressed part:

    * ``topk`` None: dense over the visible entries ``i < (t+1)//ratio`` (HCA, dense-stage CSA);
    * ``topk [B, T, k]`` int32 (-1 = empty slot; listed entries must be visible and distinct, as
      ``select_topk`` gives) and ``dense`` None: sparse, only the listed entries (gathered);
    * both: ``dense`` (Python or traced scalar bool) picks dense (True) or sparse with ``lax.cond``.

    ``segment_ids [B, T]`` (packed documents; 0 = padding, just another id here): window keys and
    dense-path entries only of the query's segment; ``comp_segment_ids [B, N]`` defaults to
    ``entry_segments(segment_ids, ratio)``. ``scale`` defaults to ``c**-0.5``. ``q_chunk`` query
    tokens per chunk (default ``default_q_chunk``), ``comp_block`` entries per online-softmax block
    of the dense path (default ``DEFAULT_COMP_BLOCK``).

    Returns (out ``[B, T, H, c]`` fp32, lse ``[B, T, H]`` fp32, log of the denominator including
    the sink). Queries that see only the sink give out = 0, lse = sink. Equals
    ``attention_reference(q, kv, sink, window, comp, comp_mask, kv_mask=window & same segment,
    return_lse=True)``. Memory O(T * (q_chunk + window + k)) forward and backward (custom VJP).
    """
    B, T, H, c = q.shape
    scale = c ** -0.5 if scale is None else float(scale)
    qf, kvf, sinkf = q.astype(F32), kv.astype(F32), sink.astype(F32)
    N = 0 if comp is None else comp.shape[1]
    compf = comp.astype(F32) if N > 0 else None
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    cseg = None
    if seg is not None and N > 0:
        cseg = (_entry_segments(seg, ratio, N) if comp_segment_ids is None else comp_segment_ids).astype(jnp.int32)
    C = default_q_chunk(T, window) if q_chunk is None else max(1, min(int(q_chunk), T))
    nC = -(-T // C)
    Kb = max(1, min(DEFAULT_COMP_BLOCK if comp_block is None else int(comp_block), max(N, 1)))
    nK = -(-N // Kb) if N > 0 else 0
    window = max(int(window), 0)

    def run(mode):
        p = _Plan(T, window, int(ratio), mode, C, nC, Kb, nK, N, scale, seg is not None)
        tk = topk.astype(jnp.int32) if mode == "sparse" else None
        s = seg if (seg is not None and (window > 0 or mode == "dense")) else None
        p = p._replace(segmented=s is not None)
        if mode != "dense":
            p = p._replace(n_blocks=0)
        cs = cseg if (mode == "dense" and s is not None) else None
        cp = compf if mode != "none" else None
        return _core(p, qf, kvf, cp, sinkf, tk, s, cs)

    if N == 0:
        return run("none")
    if topk is None:
        return run("dense")
    if topk.shape[-1] == 0:
        return run("none") if dense is None else _cond(dense, lambda: run("dense"), lambda: run("none"))
    if dense is None:
        return run("sparse")
    return _cond(dense, lambda: run("dense"), lambda: run("sparse"))


def _cond(pred, true_fn, false_fn):
    """``lax.cond`` on a traced bool; a Python bool picks statically."""
    if isinstance(pred, bool):
        return true_fn() if pred else false_fn()
    return lax.cond(jnp.asarray(pred, bool), true_fn, false_fn)


# ----------------------------------------------------------------------------- cached (decode / prefill chunk)
def attention_cached_xla(q, keys, key_mask, sink, *, comp=None, comp_mask=None, topk=None,
                         scale: float | None = None):
    """Core attention against a KV cache (spec 3.5, 3.8): one prefill chunk or a decode step.

    q ``[B, T, H, c]``; keys ``[B, S, c]`` (ring-buffer slots + the chunk) with key_mask
    ``[B, T, S]`` bool; sink ``[H]``; comp ``[B, N, c]`` cached entries with either comp_mask
    ``[B, T, N]`` (HCA: the visible cached entries) or topk ``[B, T, k]`` int32 (CSA: only the
    listed entries are read, gathered; -1 = empty slot; if comp_mask is also given, a listed entry
    must also be set in it). Returns (out ``[B, T, H, c]``, lse ``[B, T, H]``) in fp32; equals
    ``attention_reference(q, keys, sink, 0, comp, comp_mask or topk_to_mask(topk, N),
    kv_mask=key_mask, return_lse=True)``.
    """
    B, T, H, c = q.shape
    scale = c ** -0.5 if scale is None else float(scale)
    qf, kf, sinkf = q.astype(F32), keys.astype(F32), sink.astype(F32)
    s = jnp.einsum("bthd,bsd->bths", qf, kf) * scale
    parts = [(jnp.where(key_mask[:, :, None, :], s, -jnp.inf), kf, "bths,bsd->bthd")]
    N = 0 if comp is None else comp.shape[1]
    if N > 0:
        cf = comp.astype(F32)
        if topk is not None:
            if topk.shape[-1] > 0:
                valid = (topk >= 0) & (topk < N)
                ids = jnp.clip(topk, 0, N - 1).astype(jnp.int32)
                if comp_mask is not None:
                    valid = valid & jnp.take_along_axis(comp_mask, ids, axis=-1)
                g = _gather_rows(cf, ids)                                       # [B, T, k, c]
                sc = jnp.einsum("bthd,btkd->bthk", qf, g) * scale
                parts.append((jnp.where(valid[:, :, None, :], sc, -jnp.inf), g, "bthk,btkd->bthd"))
        elif comp_mask is not None:
            sc = jnp.einsum("bthd,bnd->bthn", qf, cf) * scale
            parts.append((jnp.where(comp_mask[:, :, None, :], sc, -jnp.inf), cf, "bthn,bnd->bthd"))
        else:
            raise ValueError("attention_cached_xla: comp needs comp_mask (HCA) or topk (CSA)")
    m, l, acc = _merge_parts(parts, sinkf, (B, T, H, c))
    return acc / jnp.where(l > 0, l, 1.0)[..., None], m + jnp.log(l)


# ----------------------------------------------------------------------------- lightning indexer
def _index_scores(q, keys, w):
    """``sum_h w[.., h] * relu(q[.., h, :] . key)``: q ``[B, C, nI, cI]``, keys ``[B, n, cI]``,
    w ``[B, C, nI]`` -> ``[B, C, n]`` (same contraction order as ``indexer.indexer_scores``)."""
    s = jnp.einsum("bchd,bnd->bchn", q, keys)
    return jnp.einsum("bchn,bch->bcn", jax.nn.relu(s), w)


def _order_key(x):
    """fp32 -> uint32 with the same order (-0 = +0, as a float compare; +-inf in place)."""
    b = lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), jnp.int32)
    b = jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)
    return lax.bitcast_convert_type(b ^ jnp.int32(-(2 ** 31)), jnp.uint32)


def select_positions(scores, k: int):
    """Threshold-and-compact top-k: ``scores [..., n]`` fp32 (``-inf`` = not visible) ->
    ``[..., k]`` int32 positions of the k largest visible scores in ascending position order
    (ties at the k-th value go to the lower positions, as ``lax.top_k``), then ``n`` for
    empty slots (fewer than k visible; ``take_along_axis`` clamps them, callers mask them).

    The k-th largest value is found exactly by bisection on the 32 bits of an order-preserving
    integer key (32 passes of compare-and-count over the row, no sort), the selected positions
    are compacted with a running count and a binary search per output slot. On XLA:CPU this does
    O(32 n) vector work per row where ``lax.top_k`` sorts. (``lax.approx_max_k`` is exact top-k
    off TPU, so it does not help here.)"""
    n = scores.shape[-1]
    u = _order_key(scores)
    vis = scores > -jnp.inf

    def bisect(i, t):
        cand = t | (jnp.uint32(1) << (jnp.uint32(31) - i.astype(jnp.uint32)))
        count = jnp.sum((u >= cand[..., None]).astype(jnp.int32), axis=-1)
        return jnp.where(count >= k, cand, t)

    t = lax.fori_loop(0, 32, bisect, jnp.zeros(scores.shape[:-1], jnp.uint32))[..., None]
    above = (u > t) & vis
    tied = (u == t) & vis
    need = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    take = above | (tied & (jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= need))
    count = jnp.cumsum(take, axis=-1, dtype=jnp.int32)
    slots = jnp.arange(1, k + 1, dtype=jnp.int32)
    find = jax.vmap(lambda c: jnp.searchsorted(c, slots, side="left", method="scan_unrolled"))
    pos = find(count.reshape(-1, n)).reshape(scores.shape[:-1] + (k,))
    return jnp.where(slots <= count[..., -1:], pos, n).astype(jnp.int32)


def indexer_topk_xla(q, keys, weights, k: int, *, ratio: int, segment_ids=None, key_segment_ids=None,
                     q_chunk: int | None = None, key_block: int | None = None, select: str = "top_k"):
    """Lightning-indexer selection (spec 3.4 steps 5-6), chunked over queries and key blocks.

    q ``[B, T, n_I, c_I]``, keys ``[B, N, c_I]``, weights ``[B, T, n_I]`` (already scaled) ->
    idx ``[B, T, min(k, N)]`` int32: the top visible entries (``i < (t+1)//ratio``, and with
    ``segment_ids [B, T]`` also ``key_segment_ids[b, i] == segment_ids[b, t]``, by default
    ``entry_segments(segment_ids, ratio)``), best first, ties to the lower entry index, -1 for picks
    that are not visible. Equals ``select_topk(indexer_scores(q, keys, weights), visible, k)``.
    A running top-k per query is merged with each key block's scores (``lax.top_k`` over
    [running | block]), so the ``[T, N]`` score matrix never exists. No gradient.
    ``select="threshold"`` merges with ``select_positions`` instead (bisection + compaction, no
    sort): the same set, in ascending entry order with the -1 holes last (``Runtime.index_select``).
    Not the default: on XLA:CPU it is no faster (2026-12-07, ``experiments/long_context_bench.py
    --index-select``): CSA layer forward (k 512) 5.44 / 15.35 s at 16K / 32K against lax.top_k's
    5.92 / 15.23 s; the tiny model (k 16) 9.86 / 26.9 s against 6.54 / 17.7 s.
    """
    B, T, nI, cI = q.shape
    N = keys.shape[1]
    K = min(int(k), N)
    if K <= 0:
        return jnp.zeros((B, T, 0), jnp.int32)
    q, keys, weights = (lax.stop_gradient(x.astype(F32)) for x in (q, keys, weights))
    seg = kseg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        kseg = (_entry_segments(seg, ratio, N) if key_segment_ids is None else key_segment_ids).astype(jnp.int32)
    C = max(1, min(T, DEFAULT_INDEX_Q_CHUNK if q_chunk is None else int(q_chunk)))
    nC = -(-T // C)
    if key_block is None:
        key_block = max(K, min(MAX_KEY_BLOCK, INDEX_SCORE_BUDGET // max(1, B * C * nI)))
    qch, wch = _to_chunks(q, C, nC), _to_chunks(weights, C, nC)
    segch = _to_chunks(seg, C, nC, -1) if seg is not None else jnp.zeros((nC,), jnp.int32)

    def phase(j0: int, j1: int):
        """Query chunks [j0, j1) against the key prefix they can see (a static length): causal
        queries see at most ``(t+1)//ratio`` entries, so later phases read longer prefixes."""
        Np = max(1, min(N, (j1 * C) // ratio))
        Kb = max(1, min(Np, int(key_block)))
        nK = -(-Np // Kb)
        kblocks = _to_chunks(keys[:, :Np], Kb, nK)
        ksblocks = _to_chunks(kseg[:, :Np], Kb, nK, -2) if seg is not None else jnp.zeros((nK,), jnp.int32)

        def chunk(_, xs):
            j, qc, wc, segc = xs
            nvis = (j * C + jnp.arange(C) + 1) // ratio

            def merge(carry, xs):
                vals, idx = carry
                n, kb, ks = xs
                ent = n * Kb + jnp.arange(Kb)
                vis = ((ent[None, :] < nvis[:, None]) & (ent < Np)[None, :])[None]
                if seg is not None:
                    vis = vis & (segc[:, :, None] == ks[:, None, :])
                sc = jnp.where(vis, _index_scores(qc, kb, wc), -jnp.inf)
                cv = jnp.concatenate([vals, sc], axis=-1)
                ci = jnp.concatenate([idx, jnp.broadcast_to(ent.astype(jnp.int32), sc.shape)], axis=-1)
                if select == "top_k":
                    v, pos = lax.top_k(cv, K)
                    return v, jnp.take_along_axis(ci, pos, axis=-1)
                pos = select_positions(cv, K)
                got = pos < cv.shape[-1]
                pos = jnp.minimum(pos, cv.shape[-1] - 1)
                v = jnp.where(got, jnp.take_along_axis(cv, pos, axis=-1), -jnp.inf)
                return v, jnp.where(got, jnp.take_along_axis(ci, pos, axis=-1), -1)

            def block(carry, xs):   # blocks no query of the chunk can see are skipped (they add only -inf)
                live = _block_live(ratio, j, C, xs[0], Kb)
                return lax.cond(live, merge, lambda carry, _: carry, carry, xs), None

            init = (jnp.full((B, C, K), -jnp.inf, F32), jnp.zeros((B, C, K), jnp.int32))
            (v, i), _ = lax.scan(block, init, (jnp.arange(nK), kblocks, ksblocks))
            return None, jnp.where(v == -jnp.inf, -1, i)

        sl = lambda a: a[j0:j1]
        _, idx = lax.scan(chunk, None, (jnp.arange(j0, j1), sl(qch), sl(wch), sl(segch)))
        return idx

    # equal phases of query chunks: the top-k and score work falls to about (P+1)/(2P) of a full
    # [T, N] sweep (P = INDEX_PHASES), at P compiled scans
    P = max(1, min(INDEX_PHASES, nC))
    bounds = [round(nC * g / P) for g in range(P + 1)]
    idx = jnp.concatenate([phase(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a], axis=0)
    return _from_chunks(idx, T)


# ----------------------------------------------------------------------------- indexer KL loss
def indexer_kl_xla(q, comp, lse, iq, ikeys, iw, *, ratio: int, topk=None, dense=None, segment_ids=None,
                   comp_segment_ids=None, scale: float | None = None, q_chunk: int | None = None,
                   comp_block: int | None = None):
    """Indexer training loss (``indexer_loss``; techniques 3.1/3.4), chunked over queries.

    q ``[B, T, H, c]``, comp ``[B, N, c]``, lse ``[B, T, H]`` (the layer's softmax denominators),
    iq ``[B, T, n_I, c_I]``, ikeys ``[B, N, c_I]``, iw ``[B, T, n_I]``. Entry set per query: the
    listed ``topk [B, T, k]`` entries (sparse; only those rows of comp / ikeys are gathered) or all
    visible entries (dense: ``topk`` None, or ``dense`` True, a Python or traced bool). Returns
    (KL summed over counted queries, their count), fp32 scalars, equal to ``indexer_kl(attention_mass(
    q, comp, lse, entry_set, scale), where(visible, indexer_scores(iq, ikeys, iw), -inf), entry_set,
    segment_ids > 0 or None)``. The attention mass carries no gradient (q, comp, lse are detached);
    gradients flow into iq, ikeys, iw. Dense stage: per query ``KL = A/M - log M - D/M + LSE_S(I)``
    with ``M = sum m``, ``A = sum m log m``, ``D = sum m I`` accumulated over entry blocks.
    """
    B, T, H, c = q.shape
    N = comp.shape[1]
    zero = jnp.zeros((), F32)
    if N == 0:
        return zero, zero
    scale = c ** -0.5 if scale is None else float(scale)
    q, comp, lse = (lax.stop_gradient(x.astype(F32)) for x in (q, comp, lse))
    iq, ikeys, iw = (x.astype(F32) for x in (iq, ikeys, iw))
    seg = cseg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        cseg = (_entry_segments(seg, ratio, N) if comp_segment_ids is None else comp_segment_ids).astype(jnp.int32)
    C = max(1, min(T, DEFAULT_INDEX_Q_CHUNK if q_chunk is None else int(q_chunk)))
    nC = -(-T // C)
    qmask = jnp.ones((B, T), bool) if seg is None else seg > 0
    chunks = (jnp.arange(nC), _to_chunks(q, C, nC), _to_chunks(lse, C, nC), _to_chunks(iq, C, nC),
              _to_chunks(iw, C, nC), _to_chunks(qmask, C, nC, False),
              _to_chunks(seg, C, nC, -1) if seg is not None else jnp.zeros((nC,), jnp.int32))

    def sparse():
        tk = topk.astype(jnp.int32)
        tch = _to_chunks(tk, C, nC, -1)

        @jax.checkpoint
        def body(carry, xs):
            (j, qc, lc, iqc, iwc, qm, _), tc = xs
            valid = (tc >= 0) & (tc < N)
            ids = jnp.clip(tc, 0, N - 1)
            g = _gather_rows(comp, ids)                                          # [B, C, k, c]
            gk = _gather_rows(ikeys, ids)                                        # [B, C, k, cI]
            logits = jnp.einsum("bchd,bckd->bchk", qc, g) * scale
            mass = lax.stop_gradient(jnp.where(valid, jnp.sum(jnp.exp(logits - lc[..., None]), axis=2), 0.0))
            sc = jnp.einsum("bchk,bch->bck", jax.nn.relu(jnp.einsum("bchd,bckd->bchk", iqc, gk)), iwc)
            kl, cnt = indexer_kl(mass, sc, valid, qm)
            return (carry[0] + kl, carry[1] + cnt), None

        (kl, cnt), _ = lax.scan(body, (zero, zero), (chunks, tch))
        return kl, cnt

    def dense_fn():
        Kb = max(1, min(N, DEFAULT_COMP_BLOCK if comp_block is None else int(comp_block)))
        nK = -(-N // Kb)
        blocks = (jnp.arange(nK), _to_chunks(comp, Kb, nK), _to_chunks(ikeys, Kb, nK),
                  _to_chunks(cseg, Kb, nK, -2) if seg is not None else jnp.zeros((nK,), jnp.int32))

        @jax.checkpoint
        def body(carry, xs):
            j, qc, lc, iqc, iwc, qm, segc = xs
            nvis = (j * C + jnp.arange(C) + 1) // ratio

            def update(st, bx):
                M, A, D, mx, se, cnt = st
                n, cb, kb, csb = bx
                ent = n * Kb + jnp.arange(Kb)
                inset = ((ent[None, :] < nvis[:, None]) & (ent < N)[None, :])[None]
                if seg is not None:
                    inset = inset & (segc[:, :, None] == csb[:, None, :])
                logits = jnp.einsum("bchd,bnd->bchn", qc, cb) * scale
                m = lax.stop_gradient(jnp.where(inset, jnp.sum(jnp.exp(logits - lc[..., None]), axis=2), 0.0))
                I = jnp.where(inset, _index_scores(iqc, kb, iwc), -jnp.inf)
                M = M + jnp.sum(m, axis=-1)
                A = A + jnp.sum(jnp.where(m > 0, m * jnp.log(jnp.where(m > 0, m, 1.0)), 0.0), axis=-1)
                D = D + jnp.sum(m * jnp.where(inset, I, 0.0), axis=-1)
                mx_new = lax.stop_gradient(jnp.maximum(mx, jnp.max(I, axis=-1)))
                mxs = _finite(mx_new)
                se = se * jnp.exp(mx - mxs) + jnp.sum(jnp.exp(I - mxs[..., None]), axis=-1)
                cnt = cnt + jnp.sum(inset, axis=-1)
                return M, A, D, mx_new, se, cnt

            @jax.checkpoint
            def block(st, bx):
                live = _block_live(ratio, j, C, bx[0], Kb)
                return lax.cond(live, update, lambda st, _: st, st, bx), None

            z = jnp.zeros(qc.shape[:2], F32)
            st0 = (z, z, z, jnp.full_like(z, -jnp.inf), z, jnp.zeros(qc.shape[:2], jnp.int32))
            (M, A, D, mx, se, cnt), _ = lax.scan(block, st0, blocks)
            counted = (M > 0) & (cnt > 0) & qm
            Ms = jnp.where(M > 0, M, 1.0)
            lse_i = _finite(mx) + jnp.log(jnp.where(cnt > 0, se, 1.0))
            kl_t = A / Ms - jnp.log(Ms) - D / Ms + lse_i
            kl = jnp.sum(jnp.where(counted, kl_t, 0.0))
            return (carry[0] + kl, carry[1] + jnp.sum(counted).astype(F32)), None

        (kl, cnt), _ = lax.scan(body, (zero, zero), chunks)
        return kl, cnt

    if topk is None:
        return dense_fn()
    if dense is None:
        return sparse()
    return _cond(dense, dense_fn, sparse)
