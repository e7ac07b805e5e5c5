"""The chunked XLA attention / indexer (``v4jax/attention/xla.py``) against the dense oracles:
``attention_reference`` with ``window_mask`` / ``visible_entries`` / ``topk_to_mask`` masks,
``select_topk(indexer_scores(...))``, ``indexer_kl(attention_mass(...))``. Forward within 1e-5 of
max|ref|, gradients within 1e-4 of max|grad ref|; plus a compile-time memory check (temp bytes grow
~linearly with T, the oracle's ~4x per doubling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.attention.compressor import entry_segments, visible_entries
from v4jax.attention.core import attention_reference, topk_to_mask, window_mask
from v4jax.attention.indexer import indexer_scores, select_topk
from v4jax.attention.indexer_loss import attention_mass, indexer_kl
from v4jax.attention.xla import (
    attention_cached_xla,
    attention_xla,
    indexer_kl_xla,
    indexer_topk_xla,
    select_positions,
)

H, C_DIM = 3, 16          # query heads, head dim
NI, CI = 4, 8             # indexer heads, indexer head dim


def _r(rng, shape, s=1.0):
    return jnp.asarray(s * rng.normal(size=shape), jnp.float32)


def _segments(B, T):
    """2-3 documents per row (lengths not multiples of the ratios) and a padding tail (segment 0)."""
    rows = []
    for b in range(B):
        cuts = [(11, 19, T - 30 - 5), (21, T - 21 - 7)][b % 2]
        row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(cuts)] + [np.zeros(T - sum(cuts))])
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.int32)


def _masks(B, T, window, N, ratio, seg=None):
    pos = jnp.arange(T)
    kvm = window_mask(pos, pos, window)[None]
    if seg is not None:
        kvm = kvm & (seg[:, :, None] == seg[:, None, :])
    kvm = jnp.broadcast_to(kvm, (B, T, T))
    vis = None
    if N > 0:
        v = visible_entries(pos, N, ratio, seg)
        vis = jnp.broadcast_to(v if v.ndim == 3 else v[None], (B, T, N))
    return kvm, vis


def _topk(rng, vis, k, holes=True):
    """select_topk lists of random scores (-1 at the tail where fewer are visible), plus -1 holes
    punched mid-list."""
    B, T, N = vis.shape
    idx = select_topk(_r(rng, (B, T, N)), vis, k)
    if holes and idx.shape[-1] > 2:
        hole = jnp.asarray(rng.random(idx.shape) < 0.25) & (jnp.arange(idx.shape[-1]) < idx.shape[-1] - 1)
        idx = jnp.where(hole, -1, idx)
    return idx


def _close(got, ref, tol):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    if got.size == 0:
        return
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got - ref).max()
    assert err <= tol * scale, (err, scale)


def _jit(f):
    """jit at XLA backend optimisation level 0: the shapes are tiny, compile time dominates."""
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def _attn_pair(q, kv, comp, sink, ref_fn, xla_fn, rng, tol=1e-5, gtol=1e-4):
    """Forward and (q, kv, comp, sink) gradients of a random linear loss of (out, lse), the oracle
    and the XLA path in one compiled function."""
    B, T = q.shape[:2]
    co, cl = _r(rng, (B, T, H, C_DIM)), _r(rng, (B, T, H))
    argn = (0, 1, 2, 3) if comp is not None else (0, 1, 3)

    def vg(fn, q, kv, comp, sink):
        def loss(q, kv, comp, sink):
            o, l = fn(q, kv, comp, sink)
            return jnp.sum(o * co) + jnp.sum(l * cl), (o, l)
        (_, (o, l)), g = jax.value_and_grad(loss, argnums=argn, has_aux=True)(q, kv, comp, sink)
        return o, l, g

    both = _jit(lambda *a: (vg(ref_fn, *a), vg(xla_fn, *a)))
    (o_r, l_r, g_r), (o_x, l_x, g_x) = both(q, kv, comp, sink)
    _close(o_x, o_r, tol)
    _close(l_x, l_r, tol)
    for a, b in zip(g_x, g_r):
        _close(a, b, gtol)
    return o_x, l_x, g_x


CASES = [  # T, chunk, window, ratio, mode ("sparse" | "dense" | "none" | "empty"), segmented, comp_block
    (37, 8, 8, 4, "sparse", False, None),
    (37, 8, 8, 8, "dense", False, 2),
    (64, 16, 24, 16, "dense", True, 3),     # window > chunk
    (64, 16, 8, 4, "sparse", True, None),
    (64, 16, 8, 4, "dense", True, 5),
    (37, 8, 8, 4, "none", True, None),      # window-only layer: comp=None
    (37, 8, 8, 4, "empty", False, None),    # N = 0
    (37, 8, 0, 8, "dense", False, 2),       # window 0: the first ratio-1 queries see only the sink
    (37, 8, 0, 4, "sparse", False, None),   # window 0: all -1 lists (and t < ratio-1) see only the sink
]


@pytest.mark.parametrize("T,chunk,window,ratio,mode,segmented,block", CASES)
def test_attention_matches_oracle(T, chunk, window, ratio, mode, segmented, block, rng):
    """Forward and gradients vs the oracle; with window 0 also: queries that see only the sink give
    out = 0 and lse = sink, and all gradients stay finite (-inf masks everywhere)."""
    B = 2
    seg = _segments(B, T) if segmented else None
    N = 0 if mode in ("none", "empty") else T // ratio
    q, kv, sink = _r(rng, (B, T, H, C_DIM)), _r(rng, (B, T, C_DIM)), _r(rng, (H,))
    comp = None if mode == "none" else _r(rng, (B, N, C_DIM))
    kvm, vis = _masks(B, T, window, N, ratio, seg)
    topk = _topk(rng, vis, 5) if mode == "sparse" else None
    if topk is not None and window == 0:
        topk = topk.at[:, 20:26].set(-1)
    cmask = None if N == 0 else (topk_to_mask(topk, N) if mode == "sparse" else vis)

    def ref(q, kv, comp, sink):
        return attention_reference(q, kv, sink, window, comp if N > 0 else None, cmask, kv_mask=kvm, return_lse=True)

    def xla(q, kv, comp, sink):
        cseg = None if seg is None or N == 0 else entry_segments(seg, ratio)   # explicit here, default elsewhere
        return attention_xla(q, kv, sink, window=window, comp=comp, ratio=ratio, topk=topk, segment_ids=seg,
                             comp_segment_ids=cseg, q_chunk=chunk, comp_block=block)

    o, l, g = _attn_pair(q, kv, comp, sink, ref, xla, rng)
    if window == 0:
        blind = np.zeros(T, bool)
        blind[: ratio - 1] = True
        if mode == "sparse":
            blind[20:26] = True
        assert np.all(np.asarray(o)[:, blind] == 0)
        np.testing.assert_allclose(np.asarray(l)[:, blind], np.broadcast_to(np.asarray(sink), (B, blind.sum(), H)))


def test_attention_traced_dense_flag(rng):
    """One compiled function, ``dense`` traced: True = all visible entries, False = the top-k lists."""
    B, T, window, ratio = 2, 37, 8, 4
    N = T // ratio
    q, kv, comp, sink = _r(rng, (B, T, H, C_DIM)), _r(rng, (B, T, C_DIM)), _r(rng, (B, N, C_DIM)), _r(rng, (H,))
    kvm, vis = _masks(B, T, window, N, ratio)
    topk = _topk(rng, vis, 3)
    co = _r(rng, (B, T, H, C_DIM))

    def vg(f, *a):
        return jax.value_and_grad(lambda *a: jnp.sum(f(*a) * co), argnums=(0, 1, 2, 3))(*a)

    @_jit
    def both(q, kv, comp, sink, dense, cmask):
        xla = vg(lambda q, kv, comp, sink: attention_xla(q, kv, sink, window=window, comp=comp, ratio=ratio,
                                                         topk=topk, dense=dense, q_chunk=8)[0], q, kv, comp, sink)
        ref = vg(lambda q, kv, comp, sink: attention_reference(q, kv, sink, window, comp, cmask, kv_mask=kvm),
                 q, kv, comp, sink)
        return xla, ref

    for flag, cmask in ((True, vis), (False, topk_to_mask(topk, N))):
        (v_x, g_x), (v_r, g_r) = both(q, kv, comp, sink, jnp.bool_(flag), cmask)
        _close(v_x, v_r, 1e-5)
        for a, b in zip(g_x, g_r):
            _close(a, b, 1e-4)


def test_attention_bf16_inputs(rng):
    B, T, window, ratio = 2, 64, 8, 4
    N = T // ratio
    q = _r(rng, (B, T, H, C_DIM)).astype(jnp.bfloat16)
    kv = _r(rng, (B, T, C_DIM)).astype(jnp.bfloat16)
    comp = _r(rng, (B, N, C_DIM)).astype(jnp.bfloat16)
    sink = _r(rng, (H,))
    seg = _segments(B, T)
    kvm, vis = _masks(B, T, window, N, ratio, seg)
    topk = _topk(rng, vis, 4)
    cmask = topk_to_mask(topk, N)

    def ref(q, kv, comp, sink):   # the oracle on the rounded inputs, in fp32
        f = lambda x: x.astype(jnp.float32)
        return attention_reference(f(q), f(kv), sink, window, f(comp), cmask, kv_mask=kvm, return_lse=True)

    def xla(q, kv, comp, sink):
        return attention_xla(q, kv, sink, window=window, comp=comp, ratio=ratio, topk=topk, segment_ids=seg,
                             q_chunk=16)

    o, l, g = _attn_pair(q, kv, comp, sink, ref, xla, rng, tol=1e-4, gtol=2e-2)   # grads come back in bf16
    assert o.dtype == jnp.float32 and l.dtype == jnp.float32
    assert [x.dtype for x in g] == [jnp.bfloat16] * 3 + [jnp.float32]


@pytest.mark.parametrize("csa", [True, False])
def test_attention_cached_matches_oracle(csa, rng):
    B, T, W, N = 2, 3, 8, 10
    S = W + T
    q, keys, comp, sink = _r(rng, (B, T, H, C_DIM)), _r(rng, (B, S, C_DIM)), _r(rng, (B, N, C_DIM)), _r(rng, (H,))
    key_mask = jnp.asarray(rng.random((B, T, S)) < 0.6).at[1, 2].set(False)
    if csa:
        topk = jnp.asarray(rng.permuted(np.tile(np.arange(N), (B, T, 1)), axis=-1)[..., :4], jnp.int32)
        topk = topk.at[0, 1, 2].set(-1).at[1, 2].set(-1)        # a hole; one query sees only the sink
        kw, cmask = dict(topk=topk), topk_to_mask(topk, N)
    else:
        cmask = jnp.asarray(rng.random((B, T, N)) < 0.5).at[1, 2].set(False)
        kw = dict(comp_mask=cmask)
    (o_r, l_r), (o_x, l_x) = _jit(lambda q, k, c, s: (
        attention_reference(q, k, s, 0, c, cmask, kv_mask=key_mask, return_lse=True),
        attention_cached_xla(q, k, key_mask, s, comp=c, **kw)))(q, keys, comp, sink)
    _close(o_x, o_r, 1e-5)
    _close(l_x, l_r, 1e-5)
    assert np.all(np.asarray(o_x[1, 2]) == 0)


def _ascending(idx):
    """A top-k list as its set: entries ascending, the -1 holes last."""
    big = np.iinfo(np.int32).max
    s = np.sort(np.where(np.asarray(idx) < 0, big, np.asarray(idx)), -1)
    return np.where(s == big, -1, s)


@pytest.mark.parametrize("T,chunk,ratio,k,block,segmented", [
    (37, 8, 4, 4, 4, False), (37, 8, 4, 16, 3, False), (64, 16, 4, 5, 3, True), (64, 16, 8, 3, 8, True)])
def test_indexer_topk_matches_oracle(T, chunk, ratio, k, block, segmented, rng):
    """Both selections: ``top_k`` (running lax.top_k, best first, exactly the oracle's list) and
    ``threshold`` (bisection + compaction: the oracle's set, ascending, holes last), with ties
    (a query whose head weights are all zero scores every entry 0: the lowest entries win)."""
    B = 2
    N = T // ratio
    seg = _segments(B, T) if segmented else None
    iq, ik, iw = _r(rng, (B, T, NI, CI)), _r(rng, (B, N, CI)), _r(rng, (B, T, NI))
    iw = iw.at[0, T - 1].set(0.0)
    _, vis = _masks(B, T, 1, N, ratio, seg)
    ref, got_k, got_t = _jit(lambda a, b, c: (
        select_topk(indexer_scores(a, b, c), vis, k),
        indexer_topk_xla(a, b, c, k, ratio=ratio, segment_ids=seg, q_chunk=chunk, key_block=block, select="top_k"),
        indexer_topk_xla(a, b, c, k, ratio=ratio, segment_ids=seg, q_chunk=chunk, key_block=block,
                         select="threshold")))(iq, ik, iw)
    for got in (got_k, got_t):
        assert got.dtype == jnp.int32 and got.shape == ref.shape == (B, T, min(k, N))
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(got_t), _ascending(ref))
    assert (np.asarray(ref) == -1).any()


def test_select_positions_against_numpy(rng):
    """Threshold-and-compact top-k on rows with ties, -inf (invisible), -0.0 / +0.0, +-large values
    and rows with fewer than k visible entries, against a numpy stable sort."""
    n, k = 50, 7
    x = rng.standard_normal((12, n)).astype(np.float32)
    x[0] = 0.0                                          # all tied
    x[1, ::2] = -np.inf                                 # half invisible
    x[2, 3:] = -np.inf                                  # 3 visible < k
    x[3] = np.round(x[3])                               # many ties at several values
    x[4, :10] = -0.0
    x[5] *= 1e30
    x[6] = -np.inf                                      # nothing visible
    got = np.asarray(jax.jit(lambda s: select_positions(s, k))(jnp.asarray(x)))
    for r in range(len(x)):
        order = np.argsort(-x[r], kind="stable")[:k]    # best first, ties to the lower position
        want = np.sort(order[x[r][order] > -np.inf])
        want = np.concatenate([want, np.full(k - len(want), n)])
        np.testing.assert_array_equal(got[r], want, err_msg=f"row {r}")


@pytest.mark.parametrize("T,chunk,ratio,segmented,block", [(37, 8, 4, False, 4), (64, 16, 4, True, 5)])
def test_indexer_kl_matches_oracle(T, chunk, ratio, segmented, block, rng):
    """Both stages (the traced ``dense`` flag, one compile): KL value, count and the
    (iq, ikeys, iw) gradients against the oracle."""
    B, window = 2, 8
    N = T // ratio
    seg = _segments(B, T) if segmented else None
    q, kv, comp, sink = _r(rng, (B, T, H, C_DIM)), _r(rng, (B, T, C_DIM)), _r(rng, (B, N, C_DIM)), _r(rng, (H,))
    iq, ik, iw = _r(rng, (B, T, NI, CI)), _r(rng, (B, N, CI)), _r(rng, (B, T, NI))
    kvm, vis = _masks(B, T, window, N, ratio, seg)
    topk = _topk(rng, vis, 4)
    qmask = None if seg is None else seg > 0
    scale = C_DIM ** -0.5

    def both(iq, ik, iw, dense):
        eset = jnp.where(dense, vis, topk_to_mask(topk, N))
        _, lse = attention_reference(q, kv, sink, window, comp, eset, kv_mask=kvm, return_lse=True)

        def ref(iq, ik, iw):
            sc = jnp.where(vis, indexer_scores(iq, ik, iw), -jnp.inf)
            return indexer_kl(attention_mass(q, comp, lse, eset, scale), sc, eset, qmask)

        def xla(iq, ik, iw):
            return indexer_kl_xla(q, comp, lse, iq, ik, iw, ratio=ratio, topk=topk, dense=dense, segment_ids=seg,
                                  q_chunk=chunk, comp_block=block)

        return [jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(iq, ik, iw) for f in (ref, xla)]

    run = _jit(both)
    for dense in (True, False):
        ((kl_r, cnt_r), g_r), ((kl_x, cnt_x), g_x) = run(iq, ik, iw, jnp.bool_(dense))
        assert float(cnt_x) == float(cnt_r) > 0
        _close(kl_x, kl_r, 1e-5)
        for a, b in zip(g_x, g_r):
            _close(a, b, 1e-4)


def test_memory_grows_linearly():
    """Compiled temp bytes of forward+backward at T=2048 vs 4096 (lowered and compiled, never run):
    the chunked implementation (a sparse CSA layer with top-8 lists + an HCA layer, ratio 16) grows
    ~linearly, the dense oracle (HCA layer) ~4x."""
    Hm, c, W = 2, 16, 16
    S = jax.ShapeDtypeStruct

    def temp(T, fn):
        def loss(q, kv, comp4, comp16, sink, tk):
            pos = jnp.arange(T)
            if fn == "xla":
                o1, l1 = attention_xla(q, kv, sink, window=W, comp=comp4, ratio=4, topk=tk)
                o2, l2 = attention_xla(q, kv, sink, window=W, comp=comp16, ratio=16)
            else:   # the HCA layer only
                o1, l1 = attention_reference(q, kv, sink, W, comp16, visible_entries(pos, T // 16, 16)[None],
                                             kv_mask=window_mask(pos, pos, W)[None], return_lse=True)
                o2, l2 = o1, l1
            return jnp.sum(o1 * o2) + jnp.sum(l1 * l2)

        args = (S((1, T, Hm, c), jnp.float32), S((1, T, c), jnp.float32), S((1, T // 4, c), jnp.float32),
                S((1, T // 16, c), jnp.float32), S((Hm,), jnp.float32), S((1, T, 8), jnp.int32))
        mem = _jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile().memory_analysis()
        if mem is None:   # a backend without memory analysis
            pytest.skip("memory_analysis unavailable")
        return mem.temp_size_in_bytes

    a, b = temp(2048, "xla"), temp(4096, "xla")
    assert b / a < 2.6, (a, b)
    assert b < 4096 * 4096 * 4 // 8          # far below one [T, T] fp32 array
    a, b = temp(2048, "ref"), temp(4096, "ref")
    assert b / a > 3.5, (a, b)
