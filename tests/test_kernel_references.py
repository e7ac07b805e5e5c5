"""The ``kernels_pallas`` references against the model's oracles, and ``kernels_pallas`` as a leaf.

``kernels_pallas`` is self-contained: its pure-jnp references (``*/reference.py``) restate the
math instead of importing it from ``v4jax``. This file (which may import both) ties them together:
each reference and its masks must match the oracle in ``v4jax/attention/`` (``core``,
``compressor``, ``indexer``) on random inputs with packed documents, ``-1`` top-k slots, no
compressed entries, ratios 4 and 8; outputs and lse to 1e-6 relative, masks and top-k exactly.
And nothing in ``kernels_pallas`` may import ``v4jax``.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import (compressed_attention_reference, indexer_scores_reference, indexer_topk_reference,
                            sparse_attention_reference)
from kernels_pallas.compressed_attention import reference as ca_ref
from kernels_pallas.indexer import reference as ix_ref
from kernels_pallas.sparse_attention import reference as sp_ref
from v4jax.attention.compressor import entry_segments, visible_entries
from v4jax.attention.core import attention_reference, topk_to_mask, window_mask
from v4jax.attention.indexer import indexer_scores, select_topk

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels_pallas"

B, T, H, C, W = 2, 37, 3, 16, 8   # T = 37: not a multiple of either ratio
NI, CI = 4, 16                     # indexer heads, indexer head dim
REL = 1e-6


# ----------------------------------------------------------------------------- inputs

def _segments(seed: int, docs_per_row=(3, 2)) -> jnp.ndarray:
    """``[B, T]`` packed-document ids: row b holds ``docs_per_row[b]`` documents."""
    rng = np.random.default_rng(seed)
    out = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(3, T - 2), docs_per_row[b] - 1, replace=False))
        out[b] = np.searchsorted(cuts, np.arange(T), side="right")
    assert [len(np.unique(r)) for r in out] == list(docs_per_row)
    return jnp.asarray(out)


def _attention_inputs(N: int, seed: int):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return f(B, T, H, C), f(B, T, C), f(H), f(B, N, C)


def _oracle_topk(N: int, ratio: int, K: int, seg, seed: int, drop: float = 0.25) -> jnp.ndarray:
    """Top-k lists as the model makes them (``select_topk`` of random scores over the visible
    entries: early queries get all -1), then ``drop`` of the picks knocked out to -1 mid-list."""
    rng = np.random.default_rng(seed + 100)
    vis = visible_entries(jnp.arange(T), N, ratio, seg)
    if vis.ndim == 2:
        vis = jnp.broadcast_to(vis[None], (B, T, N))
    idx = np.asarray(select_topk(jnp.asarray(rng.normal(size=(B, T, N)), jnp.float32), vis, K))
    idx = np.where(rng.random(idx.shape) < drop, -1, idx)
    early = idx[:, :ratio - 1]
    assert (early == -1).all()                                   # no entry visible yet
    assert ((idx[..., :-1] == -1) & (idx[..., 1:] >= 0)).any()   # -1 slots in the middle of lists
    return jnp.asarray(idx, jnp.int32)


def _oracle_kv_mask(seg):
    pos = jnp.arange(T)
    m = window_mask(pos, pos, W)[None]
    return jnp.broadcast_to(m, (B, T, T)) if seg is None else m & (seg[:, :, None] == seg[:, None, :])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _check_close(ref, oracle, what=""):
    (o, l), (oo, ol) = ref, oracle
    assert o.shape == oo.shape and l.shape == ol.shape and o.dtype == oo.dtype == jnp.float32
    assert _rel(o, oo) < REL, (what, "out", _rel(o, oo))
    assert _rel(l, ol) < REL, (what, "lse", _rel(l, ol))


def _grads(fn, args, seed=7):
    """Gradients of a fixed random linear loss on ``(out, lse)``."""
    o, l = jax.eval_shape(fn, *args)
    rng = np.random.default_rng(seed)
    wo, wl = (jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in (o, l))
    loss = lambda *a: (lambda out, lse: jnp.sum(out * wo) + jnp.sum(lse * wl))(*fn(*a))
    return jax.grad(loss, argnums=tuple(range(len(args))))(*args)


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("segmented", [False, True])
def test_window_masks(segmented):
    seg = _segments(0) if segmented else None
    want = _oracle_kv_mask(seg)
    for mod in (sp_ref, ca_ref):
        assert bool(jnp.all(mod.window_kv_mask(T, W, seg, B) == want)), mod.__name__


@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("segmented", [False, True])
def test_visibility_masks(ratio, segmented):
    N = T // ratio
    seg = _segments(1) if segmented else None
    want = visible_entries(jnp.arange(T), N, ratio, seg)
    want = jnp.broadcast_to(want, (B, T, N))
    cseg = None if seg is None else entry_segments(seg, ratio)
    assert bool(jnp.all(ca_ref.visible_entry_mask(T, N, ratio, seg, cseg, B) == want))
    assert bool(jnp.all(ix_ref.visibility(T, N, ratio, seg, cseg, B) == want))


@pytest.mark.parametrize("ratio", [4, 8])
def test_topk_mask(ratio):
    N = T // ratio
    topk = _oracle_topk(N, ratio, 3, _segments(2), seed=2)
    assert bool(jnp.all(sp_ref.topk_mask(topk, N) == topk_to_mask(topk, N)))


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("segmented", [False, True])
def test_sparse_attention_reference(ratio, segmented):
    N, K = T // ratio, 3
    q, kv, sink, comp = _attention_inputs(N, seed=ratio)
    seg = _segments(3) if segmented else None
    topk = _oracle_topk(N, ratio, K, seg, seed=ratio)
    ref = lambda q, kv, s, c: sparse_attention_reference(q, kv, s, c, topk, window=W, segment_ids=seg,
                                                         return_lse=True)
    oracle = lambda q, kv, s, c: attention_reference(q, kv, s, W, c, topk_to_mask(topk, N),
                                                     kv_mask=_oracle_kv_mask(seg), return_lse=True)
    args = (q, kv, sink, comp)
    _check_close(ref(*args), oracle(*args))
    for name, a, b in zip(("dq", "dkv", "dsink", "dcomp"), _grads(ref, args), _grads(oracle, args)):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("segmented", [False, True])
def test_compressed_attention_reference(ratio, segmented):
    N = T // ratio
    q, kv, sink, comp = _attention_inputs(N, seed=10 + ratio)
    seg = _segments(4) if segmented else None
    cseg = None if seg is None else entry_segments(seg, ratio)
    comp_mask = jnp.broadcast_to(visible_entries(jnp.arange(T), N, ratio, seg), (B, T, N))
    ref = lambda q, kv, s, c: compressed_attention_reference(q, kv, s, c, ratio=ratio, window=W, segment_ids=seg,
                                                             comp_segment_ids=cseg, return_lse=True)
    oracle = lambda q, kv, s, c: attention_reference(q, kv, s, W, c, comp_mask, kv_mask=_oracle_kv_mask(seg),
                                                     return_lse=True)
    args = (q, kv, sink, comp)
    _check_close(ref(*args), oracle(*args))
    for name, a, b in zip(("dq", "dkv", "dsink", "dcomp"), _grads(ref, args), _grads(oracle, args)):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


@pytest.mark.parametrize("segmented", [False, True])
def test_no_compressed_entries(segmented):
    """N = 0 (comp ``[B, 0, c]`` or None, empty top-k lists): window + sink only, custom scale."""
    q, kv, sink, comp0 = _attention_inputs(0, seed=20)
    seg = _segments(5) if segmented else None
    want = attention_reference(q, kv, sink, W, None, None, scale=0.3, kv_mask=_oracle_kv_mask(seg), return_lse=True)
    topk0 = jnp.zeros((B, T, 0), jnp.int32)
    for comp in (comp0, None):
        _check_close(sparse_attention_reference(q, kv, sink, comp, topk0, window=W, scale=0.3, segment_ids=seg,
                                                return_lse=True), want, "sparse")
        _check_close(compressed_attention_reference(q, kv, sink, comp, ratio=4, window=W, scale=0.3, segment_ids=seg,
                                                    return_lse=True), want, "compressed")
    out = sparse_attention_reference(q, kv, sink, None, None, window=W, scale=0.3, segment_ids=seg)
    assert _rel(out, want[0]) < REL


# ----------------------------------------------------------------------------- indexer

def _indexer_inputs(N: int, seed: int):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return f(B, T, NI, CI), f(B, N, CI), f(B, T, NI) * 0.3


@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("segmented", [False, True])
def test_indexer_references(ratio, segmented):
    N = T // ratio
    q, k, w = _indexer_inputs(N, seed=30 + ratio)
    seg = _segments(6) if segmented else None
    kw = {} if seg is None else dict(segment_ids=seg, key_segment_ids=entry_segments(seg, ratio))
    vis = jnp.broadcast_to(visible_entries(jnp.arange(T), N, ratio, seg), (B, T, N))
    raw = indexer_scores(q, k, w)

    got = indexer_scores_reference(q, k, w, ratio=ratio, **kw)
    want = jnp.where(vis, raw, -jnp.inf)
    fin = np.isfinite(np.asarray(want))
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert (np.isfinite(np.asarray(got)) == fin).all() and (np.asarray(got)[~fin] == -np.inf).all()
    assert _rel(np.where(fin, got, 0), np.where(fin, want, 0)) < REL
    assert not fin[:, :ratio - 1].any()   # early queries see nothing

    for kk in (3, N, N + 5):
        picks = indexer_topk_reference(q, k, w, kk, ratio=ratio, **kw)
        oracle = select_topk(raw, vis, kk)
        assert picks.shape == oracle.shape == (B, T, min(kk, N)) and picks.dtype == jnp.int32
        assert bool(jnp.all(picks == oracle)), kk
        assert bool(jnp.any(picks == -1))


def test_topk_ties_and_invisible_picks():
    """Many exact ties (integer scores): lower index first, as ``select_topk``; -1 where not visible."""
    rng = np.random.default_rng(40)
    N = 9
    scores = jnp.asarray(rng.integers(0, 3, size=(B, T, N)), jnp.float32)
    vis = jnp.broadcast_to(visible_entries(jnp.arange(T), N, 4, _segments(7)), (B, T, N))
    for kk in (1, 4, N, N + 3):
        assert bool(jnp.all(ix_ref.select_visible_topk(scores, vis, kk) == select_topk(scores, vis, kk))), kk
    row = ix_ref.select_visible_topk(jnp.asarray([[[1.0, 2.0, 2.0, 1.0, 2.0]]]),
                                     jnp.asarray([[[1, 1, 0, 1, 1]]], bool), 5)
    assert row.tolist() == [[[1, 4, 0, 3, -1]]]


# ----------------------------------------------------------------------------- leaf library

def test_import_pulls_in_no_v4jax():
    code = ("import sys, kernels_pallas; bad=[m for m in sys.modules if m.split('.')[0]=='v4jax']; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


_V4JAX_TEXT = re.compile(r"\b(?:import|from)\s+v4jax\b|import_module\(\s*['\"]v4jax|__import__\(\s*['\"]v4jax")


def test_no_v4jax_in_kernels_pallas_sources():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) > 10
    bad = []
    for f in files:
        src = f.read_text()
        for node in ast.walk(ast.parse(src, str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{f.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] == "v4jax"]
        for i, line in enumerate(src.splitlines(), 1):
            if _V4JAX_TEXT.search(line):
                bad.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
