"""The one place that chooses how core attention and the indexer's selection are computed
(``Runtime.attention``), and the only importer of ``kernels_pallas``.

* ``"reference"``: the dense masked oracle (``core.attention_reference``, ``indexer.indexer_scores``
  + ``select_topk``, ``indexer_loss``): every mask is materialised, O(T^2) memory. Kept as the
  oracle everything else is tested against.
* ``"xla"``: ``v4jax.attention.xla``: banded window blocks, top-k gathers, online-softmax entry
  blocks, a chunked indexer with a running top-k and a chunked indexer KL (sub-quadratic).
* ``"pallas"``: ``kernels_pallas`` for the whole-sequence attention and the indexer scores; the
  indexer KL and the cached path use the portable ``xla`` functions.

Every function returns the same thing under every implementation: ``attend`` / ``attend_cached``
give (out ``[B, T, H, c]`` fp32, lse ``[B, T, H]``), ``select`` gives top-k lists ``[B, T, k']``
(-1 = none), ``indexer_kl`` an ``IndexerStats``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import kernels_pallas as kp
from v4jax.attention import xla
from v4jax.attention.compressor import entry_segments, visible_entries
from v4jax.attention.context import IndexerStats, SeqContext
from v4jax.attention.core import attention_reference, topk_to_mask, window_mask
from v4jax.attention.indexer import indexer_scores, select_topk
from v4jax.attention.indexer_loss import attention_mass
from v4jax.attention.indexer_loss import indexer_kl as indexer_kl_reference
from v4jax.config import AttentionSpec
from v4jax.sharding import active_mesh, to_mesh_spec


def _entry_segments(segment_ids, ratio, n):
    return None if segment_ids is None else entry_segments(segment_ids, ratio)[:, :n]


def _visible(T, n, ratio, segment_ids, batch):
    """Oracle visibility ``[B, T, n]`` (causality, and same document with segments)."""
    vis = visible_entries(jnp.arange(T), n, ratio, segment_ids)
    return jnp.broadcast_to(vis if vis.ndim == 3 else vis[None], (batch, T, n))


def _is_static(flag) -> bool:
    return flag is None or isinstance(flag, bool)


# -------------------------------------------------------------------------------- whole sequence
def select(impl: str, q, keys, weights, k: int, ratio: int, segment_ids=None, how: str = "top_k"):
    """Indexer top-k: q ``[B, T, n_I, c_I]``, keys ``[B, N, c_I]``, weights ``[B, T, n_I]``
    -> ``[B, T, min(k, N)]`` int32 (-1 for picks that are not visible). No gradient.
    ``how`` (``Runtime.index_select``): the ``xla`` path's running selection, "top_k" or
    "threshold" (same set; the order of the list differs, which no consumer depends on)."""
    if how != "top_k" and impl != "xla":
        raise ValueError(f"index selection {how!r} exists only on the 'xla' attention, not {impl!r}")
    q, keys, weights = (jax.lax.stop_gradient(a) for a in (q, keys, weights))
    B, T = q.shape[:2]
    n = keys.shape[1]
    kseg = _entry_segments(segment_ids, ratio, n)
    if impl == "reference":
        return select_topk(indexer_scores(q, keys, weights), _visible(T, n, ratio, segment_ids, B), k)
    if impl == "pallas":
        f = lambda q, keys, weights, seg, kseg: kp.indexer_topk(
            kp.indexer_scores(q, keys, weights, ratio=ratio, segment_ids=seg, key_segment_ids=kseg), k)
        return per_device(f, (q, keys, weights, segment_ids, kseg),
                          (("batch", None, None, None), _KV, ("batch", None, None), _TOK, _TOK), ("batch", None, None))
    return xla.indexer_topk_xla(q, keys, weights, k, ratio=ratio, segment_ids=segment_ids, key_segment_ids=kseg,
                                select=how)


def attend(impl: str, spec: AttentionSpec, q, kv, sink, comp, topk, ctx: SeqContext, q_chunk=None):
    """Core attention of a whole sequence (spec 3.5): window keys + compressed entries (all visible
    ones for HCA and dense-stage CSA, the ``topk`` lists for sparse CSA) + sink, one softmax.
    q ``[B, T, H, c]``, kv ``[B, T, c]``, comp ``[B, N, c]`` or None, topk ``[B, T, k]`` or None."""
    seg, dense = ctx.segment_ids, ctx.dense_attention
    ratio = spec.compressor.ratio if spec.compressor is not None else 1
    if topk is None:
        dense = True
    if impl == "reference":
        B, T = q.shape[:2]
        kv_mask = None
        if seg is not None:
            pos = jnp.arange(T)
            kv_mask = window_mask(pos, pos, spec.window)[None] & (seg[:, :, None] == seg[:, None, :])
        comp_mask = None
        if comp is not None:
            comp_mask = _visible(T, comp.shape[1], ratio, seg, B)
            if dense is not True:
                sparse_mask = comp_mask & topk_to_mask(topk, comp.shape[1])
                comp_mask = sparse_mask if dense is None or dense is False else jnp.where(dense, comp_mask, sparse_mask)
        return attention_reference(q, kv, sink, spec.window, comp, comp_mask, kv_mask=kv_mask, return_lse=True)
    if impl == "pallas":
        return _pallas_attend(spec, q, kv, sink, comp, topk, seg, dense)
    cseg = None if comp is None else _entry_segments(seg, ratio, comp.shape[1])
    if dense is None or dense is False:
        dense_arg = None
    elif dense is True:
        topk, dense_arg = None, None
    else:
        dense_arg = dense
    return xla.attention_xla(q, kv, sink, window=spec.window, comp=comp, ratio=ratio, topk=topk, dense=dense_arg,
                             segment_ids=seg, comp_segment_ids=cseg, q_chunk=q_chunk)


def per_device(fn, args: tuple, logical: tuple, out_logical):
    """``fn(*args)`` on each device's shard inside ``jax.shard_map`` under the active mesh (a Pallas
    kernel is one opaque call that XLA's partitioner cannot split, so it is called per device).
    ``logical``: per argument a tuple of logical axis names (``v4jax.sharding.RULES``) or None for a
    replicated argument; ``out_logical``: the same for each output. An axis whose size the mesh
    does not divide stays whole. Without a mesh, just ``fn(*args)``."""
    mesh = active_mesh()
    if mesh is None:
        return fn(*args)

    def spec(a, names):
        if names is None or a is None:
            return P()
        resolved = []
        for size, ax in zip(a.shape, to_mesh_spec(names, mesh)):
            axes = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            n = 1
            for x in axes:
                n *= mesh.shape[x]
            resolved.append(ax if ax is not None and size % n == 0 else None)
        return P(*resolved)

    in_specs = tuple(spec(a, n) for a, n in zip(args, logical))
    # outputs: the axes of the first argument with the same logical name (q's batch and heads)
    names = {n: ax for a, lg in zip(args, logical) if lg is not None and a is not None
             for n, ax in zip(lg, spec(a, lg))}
    out_spec = lambda lg: P(*(None if n is None else names.get(n) for n in lg))
    out_specs = [out_spec(lg) for lg in out_logical] if isinstance(out_logical, list) else out_spec(out_logical)
    out_specs = tuple(out_specs) if isinstance(out_specs, list) else out_specs
    keep = [i for i, a in enumerate(args) if a is not None]

    def body(*present):
        full = [None] * len(args)
        for i, a in zip(keep, present):
            full[i] = a
        return fn(*full)

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs[i] for i in keep), out_specs=out_specs,
                         check_vma=False)(*(args[i] for i in keep))


_Q, _KV, _TOK = ("batch", "act_seq", "heads", None), ("batch", None, None), ("batch", None)
_ATTN_OUT = [("batch", "act_seq", "heads", None), ("batch", "act_seq", "heads")]


def _pallas_attend(spec: AttentionSpec, q, kv, sink, comp, topk, seg, dense):
    if comp is None:
        f = lambda q, kv, sink, seg: kp.compressed_attention(q, kv, sink, None, ratio=1, window=spec.window,
                                                             segment_ids=seg, return_lse=True)
        return per_device(f, (q, kv, sink, seg), (_Q, _KV, ("heads",), _TOK), _ATTN_OUT)
    ratio = spec.compressor.ratio
    cseg = _entry_segments(seg, ratio, comp.shape[1])

    def dense_fn(_=None):
        f = lambda q, kv, sink, comp, seg, cseg: kp.compressed_attention(
            q, kv, sink, comp, ratio=ratio, window=spec.window, segment_ids=seg, comp_segment_ids=cseg,
            return_lse=True)
        return per_device(f, (q, kv, sink, comp, seg, cseg), (_Q, _KV, ("heads",), _KV, _TOK, _TOK), _ATTN_OUT)

    def sparse_fn(_=None):
        f = lambda q, kv, sink, comp, topk, seg: kp.sparse_attention(q, kv, sink, comp, topk, window=spec.window,
                                                                     segment_ids=seg, return_lse=True)
        return per_device(f, (q, kv, sink, comp, topk, seg), (_Q, _KV, ("heads",), _KV, ("batch", None, None), _TOK),
                          _ATTN_OUT)

    if dense is True:
        return dense_fn()
    if dense is None or dense is False:
        return sparse_fn()
    return jax.lax.cond(dense, dense_fn, sparse_fn, None)


def indexer_kl(impl: str, spec: AttentionSpec, q, comp, lse, iq, ikeys, iw, topk, ctx: SeqContext,
               q_chunk=None) -> IndexerStats:
    """The indexer's KL to the main attention's mass on the entries the layer attended to
    (``v4jax.attention.indexer_loss``): all visible entries in the dense stages, the top-k lists
    in the sparse stage. The mass carries no gradient; the scores' gradient reaches the indexer."""
    seg, dense = ctx.segment_ids, ctx.dense_attention
    ratio = spec.compressor.ratio
    scale = spec.head_dim ** -0.5
    if impl == "reference":
        B, T = q.shape[:2]
        n = comp.shape[1]
        vis = _visible(T, n, ratio, seg, B)
        sparse_set = vis & topk_to_mask(topk, n)
        if dense is True:
            entry = vis
        elif dense is None or dense is False:
            entry = sparse_set
        else:
            entry = jnp.where(dense, vis, sparse_set)
        mass = attention_mass(q, comp, lse, entry, scale)
        scores = jnp.where(vis, indexer_scores(iq, ikeys, iw), -jnp.inf)
        kl, count = indexer_kl_reference(mass, scores, entry, None if seg is None else seg > 0)
        return IndexerStats(kl, count)
    cseg = _entry_segments(seg, ratio, comp.shape[1])
    if dense is True:
        topk_arg, dense_arg = None, None
    elif dense is None or dense is False:
        topk_arg, dense_arg = topk, None
    else:
        topk_arg, dense_arg = topk, dense
    kl, count = xla.indexer_kl_xla(q, comp, lse, iq, ikeys, iw, ratio=ratio, topk=topk_arg, dense=dense_arg,
                                   segment_ids=seg, comp_segment_ids=cseg, scale=scale, q_chunk=q_chunk)
    return IndexerStats(kl, count)


# -------------------------------------------------------------------------------- cached path
def select_cached(q, keys, weights, k: int, visible):
    """Top-k for a chunk against the cached indexer keys: visible ``[B, T, N]`` (T is a chunk, so
    the chunk's score rows are small; the O(T * N) scoring is the indexer's design)."""
    return select_topk(indexer_scores(q, keys, weights), visible, k)


def attend_cached(impl: str, q, keys, key_mask, sink, comp=None, visible=None, topk=None):
    """A prefill chunk or a decode step: keys ``[B, S, c]`` = window ring + chunk with key_mask
    ``[B, T, S]``; comp ``[B, N, c]`` the cached entries with their visibility ``[B, T, N]``
    (HCA: all of them) or, for CSA, the ``topk`` lists (only those entries are read)."""
    if impl == "reference":
        comp_mask = visible
        if comp is not None and topk is not None:
            comp_mask = visible & topk_to_mask(topk, comp.shape[1])
        return attention_reference(q, keys, sink, 0, comp, comp_mask, kv_mask=key_mask, return_lse=True)
    if comp is not None and topk is not None:
        return xla.attention_cached_xla(q, keys, key_mask, sink, comp=comp, topk=topk)
    return xla.attention_cached_xla(q, keys, key_mask, sink, comp=comp, comp_mask=visible)
