"""On-disk prefix KV cache (issue #14 item 3, ``v4jax.inference.prefix_cache``): an entry restored
into a fresh cache is bit-identical to the prefilled row (native and fp8), extending from it gives
the logits of a whole prefill, other models / configs / formats miss, damaged entries are warned
about and never used, LRU eviction keeps the directory under ``max_bytes``, and the longest
aligned stored prefix wins.

One small config (fp8-capable widths), batch 2, ``max_len`` 64 and chunks of 8 / 16 tokens
everywhere, so the whole file compiles only a handful of extend shapes."""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax
import numpy as np
import pytest

import v4jax
from v4jax.config import preset
from v4jax.inference import prefix_cache as pcm
from v4jax.inference.prefix_cache import (PrefixCache, bytes_per_token, cache_layout, checkpoint_lengths,
                                          entry_payload_bytes, fixed_state_bytes, model_fingerprint,
                                          prefill_with_cache, restore_into, set_model_fingerprint, take_row,
                                          weights_fingerprint)

from conftest import random_variables, small_config

CFG = small_config(head_dim=128, rope_head_dim=64, index_head_dim=64, n_mtp_layers=0)  # ratios 4 and 8
ALIGN, M, T = 8, 64, 40


@pytest.fixture(scope="module")
def model():
    return v4jax.V4Model(CFG, random_variables(CFG, seed=3))


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(11).integers(0, 256, size=(2, T)).astype(np.int32)


@pytest.fixture(scope="module")
def snaps(model, prompts):
    """Native cache after prefilling 8, 16 and 32 tokens (chunks 8, 8, 16): {L: (host cache, row-1 state)}."""
    cache, out, p = model.new_cache(2, M), {}, 0
    for n in (8, 8, 16):
        _, cache = model.extend(prompts[:, p:p + n], cache)
        p += n
        out[p] = (jax.device_get(cache), take_row(model, cache, 1))
    return out


@pytest.fixture(scope="module")
def snap_fp8(model, prompts):
    _, cache = model.prefill(prompts[:, :16], max_len=M, fmt="fp8")
    return jax.device_get(cache), take_row(model, cache, 0)


def pc(tmp_path, **kw) -> PrefixCache:
    return PrefixCache(tmp_path / "pc", align=ALIGN, **kw)


def bits(a) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(a))
    return a.reshape(-1).view(np.uint8)


def assert_row_equal(restored, r_row, ref, ref_row, fmt="native"):
    """Every per-row leaf of ``restored[r_row]`` is bit-identical to ``ref[ref_row]``; shared
    leaves equal too. Returns the set of leaf dtypes seen."""
    lay = cache_layout(CFG, fmt)
    got = jax.tree_util.tree_flatten_with_path(jax.device_get(restored))[0]
    want = jax.tree_util.tree_flatten_with_path(ref)[0]
    dtypes = set()
    for spec, (p, g), (_, w) in zip(lay.leaves, got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, spec.path
        if spec.batch_axis is not None:
            g, w = np.take(g, r_row, spec.batch_axis), np.take(w, ref_row, spec.batch_axis)
        np.testing.assert_array_equal(bits(g), bits(w), err_msg=spec.path)
        dtypes.add(g.dtype.name)
    return dtypes


# -- (a) bit-exact restore -----------------------------------------------------------------------

def test_restore_is_bit_exact_native(model, prompts, snaps, tmp_path):
    c = pc(tmp_path)
    for L, (_, st) in snaps.items():
        assert c.store(model, prompts[1], st) is not None
    fresh_reader = pc(tmp_path)                       # a new object: everything comes from disk
    for L, (ref, _) in snaps.items():
        got_L, state = fresh_reader.lookup(model, prompts[1, :L + 1])
        assert got_L == L and int(state.leaves["pos"]) == L
        empty = model.new_cache(2, M)
        restored = restore_into(empty, 0, state)
        assert_row_equal(restored, 0, ref, 1)
        assert_row_equal(restored, 1, jax.device_get(empty), 1)     # the other row is untouched
        assert np.asarray(restored["pos"]).tolist() == [L, 0]


def test_restore_is_bit_exact_fp8(model, prompts, snap_fp8, tmp_path):
    ref, st = snap_fp8
    raw = sum(a.nbytes for a in st.leaves.values())
    assert st.nbytes < raw                            # FP4 indexer keys are packed two per byte
    fp4 = [a for p, a in st.leaves.items() if a.dtype == np.dtype("float4_e2m1fn")]
    assert fp4 and all(np.abs(a.astype(np.float32)).max() > 0 for a in fp4)
    c = pc(tmp_path)
    c.store(model, prompts[0], st)
    assert pc(tmp_path).lookup(model, prompts[0, :17], fmt="native") == (0, None)   # other format
    L, state = pc(tmp_path).lookup(model, prompts[0, :17], fmt="fp8")
    assert L == 16
    restored = restore_into(model.new_cache(2, M, "fp8"), 1, state, donate=True)
    dtypes = assert_row_equal(restored, 1, ref, 0, "fp8")
    assert {"float8_e4m3fn", "float8_e8m0fnu", "float4_e2m1fn", "bfloat16", "float32", "int32"} <= dtypes


def test_entry_bytes_scale_with_prefix_not_max_len(model, prompts, snaps, snap_fp8, tmp_path):
    s8, s16, s32 = (snaps[L][1] for L in (8, 16, 32))
    bpt = bytes_per_token(CFG)
    assert s32.nbytes - s16.nbytes == 16 * bpt and s16.nbytes - s8.nbytes == 8 * bpt
    assert entry_payload_bytes(CFG, 16) == s16.nbytes == fixed_state_bytes(CFG) + 16 * bpt
    assert entry_payload_bytes(CFG, 16, "fp8") == snap_fp8[1].nbytes
    assert bytes_per_token(CFG, length=32) == s32.nbytes / 32
    # a cache twice as long stores the same bytes
    big = model.new_cache(1, 2 * M)
    restored = restore_into(big, 0, s16)
    assert take_row(model, restored, 0).nbytes == s16.nbytes
    path = pc(tmp_path).store(model, prompts[1], s16)
    assert s16.nbytes < os.path.getsize(path) < s16.nbytes + 16384


# -- (b) extending from restored prefixes gives the whole prefill's logits -------------------------

def test_prefill_with_cache_matches_prefill(model, prompts, snaps, tmp_path):
    c = pc(tmp_path)
    lengths = np.array([40, 37])
    info = {}
    got, cache = prefill_with_cache(model, prompts, lengths, M, "native", c, info=info)
    assert info["hits"] == [0, 0] and info["stored"] == [(0, 8), (1, 8), (0, 16), (1, 16), (0, 32), (1, 32)]
    ref, ref_cache = model.prefill(prompts, max_len=M, lengths=lengths)
    ref = np.asarray(ref)
    scale = np.abs(ref).max()
    last = ref[np.arange(2), lengths - 1]
    assert np.abs(np.asarray(got) - last).max() <= 1e-4 * scale
    assert np.asarray(cache["pos"]).tolist() == [40, 37]

    # second batch: row 0 repeats prompt 0 (hit 32), row 1 shares only 20 tokens of prompt 1 (hit 16)
    ids = prompts.copy()
    ids[1, 20:] = np.random.default_rng(5).integers(0, 256, size=T - 20)
    info = {}
    got, cache = prefill_with_cache(model, ids, None, M, "native", c, info=info)
    assert info["hits"] == [32, 16] and info["stored"] == [(1, 32)]
    ref, ref_cache = model.prefill(ids, max_len=M)
    ref = np.asarray(ref)
    assert np.abs(np.asarray(got) - ref[:, -1]).max() <= 1e-4 * np.abs(ref).max()
    for g, w in zip(jax.tree.leaves(jax.device_get(cache)), jax.tree.leaves(jax.device_get(ref_cache))):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max())
    assert c.stats["hits"] == 2 and c.stats["misses"] == 2


def test_prefill_with_cache_without_a_cache(model, prompts):
    got, cache = prefill_with_cache(model, prompts[:, :32], None, M, "native", None, chunk_size=16)
    ref, _ = model.prefill(prompts[:, :32], max_len=M, chunk_size=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref)[:, -1], rtol=1e-5, atol=1e-5)


# -- (c) other models never match ----------------------------------------------------------------

def test_other_weights_config_or_format_miss(model, prompts, snaps, tmp_path):
    c = pc(tmp_path)
    c.store(model, prompts[1], snaps[16][1])
    assert c.lookup(model, prompts[1])[0] == 16
    other_weights = v4jax.V4Model(CFG, random_variables(CFG, seed=4))
    assert c.lookup(other_weights, prompts[1]) == (0, None)
    cfg2 = small_config(head_dim=128, rope_head_dim=64, index_head_dim=64, n_mtp_layers=0, swiglu_limit=7.0)
    other_cfg = v4jax.V4Model(cfg2, random_variables(cfg2, seed=3))
    assert weights_fingerprint(other_cfg.variables) == weights_fingerprint(model.variables)  # same weights
    assert c.lookup(other_cfg, prompts[1]) == (0, None)                                      # other config
    assert c.lookup(model, prompts[1], fmt="fp8") == (0, None)
    assert c.lookup(model, prompts[1], dtype="bfloat16") == (0, None)                        # other cache dtype
    changed = prompts[1].copy()
    changed[3] += 1
    assert c.lookup(model, changed) == (0, None)
    assert c.stats["hits"] == 1 and c.stats["misses"] == 5


def test_model_fingerprint_is_memoised_and_settable(model):
    fp = model_fingerprint(model)
    assert model_fingerprint(model) == fp and len(fp) == 64
    twin = v4jax.V4Model(CFG, model.variables)
    assert model_fingerprint(twin) == fp                  # same config and weights: same entries
    set_model_fingerprint(twin, "checkpoint-sha-abc")
    assert model_fingerprint(twin) != fp


# -- (d) damaged entries are never used -----------------------------------------------------------

def _no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    return ctx


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "garbage", "empty", "other_entry"])
def test_damaged_entry_warns_and_falls_back(model, prompts, snaps, tmp_path, damage):
    c = pc(tmp_path)
    p8 = c.store(model, prompts[1], snaps[8][1])
    p16 = c.store(model, prompts[1], snaps[16][1])
    data = bytearray(open(p16, "rb").read())
    if damage == "flip_payload":
        data[len(data) - 100] ^= 0x01
    elif damage == "flip_header":
        data[pcm.entry_file._PREAMBLE.size + 5] ^= 0x20
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(np.random.default_rng(0).bytes(len(data)))
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(open(p8, "rb").read())       # a valid entry under another key's name
    with open(p16, "wb") as f:
        f.write(data)
    with pytest.warns(RuntimeWarning, match=os.path.basename(p16)):
        L, state = pc(tmp_path).lookup(model, prompts[1])
    assert L == 8                                     # the next shorter valid entry, never the damaged one
    for k, a in snaps[8][1].leaves.items():
        np.testing.assert_array_equal(bits(state.leaves[k]), bits(a))
    assert not os.path.exists(p16)                    # removed: not read again
    ctx = _no_warnings()
    try:
        assert pc(tmp_path).lookup(model, prompts[1])[0] == 8
    finally:
        ctx.__exit__(None, None, None)


# -- (e) LRU eviction ------------------------------------------------------------------------------

def test_lru_eviction_order_and_bound(model, prompts, snaps, tmp_path):
    st = snaps[16][1]
    ids = {k: np.random.default_rng(100 + i).integers(0, 256, size=20).astype(np.int32)
           for i, k in enumerate("ABCDE")}
    probe = pc(tmp_path, max_bytes=1 << 40)
    size = os.path.getsize(probe.store(model, ids["A"], st))
    probe.clear()
    assert probe.stats["entries"] == 0
    c = pc(tmp_path, max_bytes=int(2.5 * size))
    pa, pb = c.store(model, ids["A"], st), c.store(model, ids["B"], st)
    assert c.lookup(model, ids["A"])[0] == 16         # A is now more recent than B
    pcc = c.store(model, ids["C"], st)
    assert os.path.exists(pa) and not os.path.exists(pb) and os.path.exists(pcc)
    s = c.stats
    assert s["entries"] == 2 and s["bytes"] <= c.max_bytes and s["evictions"] == 1
    other = pc(tmp_path, max_bytes=int(2.5 * size))    # another process sharing the directory
    assert other.lookup(model, ids["C"])[0] == 16      # C is now the most recent; A goes next
    c.store(model, ids["D"], st)
    assert not os.path.exists(pa) and os.path.exists(pcc)
    tiny = pc(tmp_path, max_bytes=size // 2)           # an entry bigger than the bound is not kept
    assert tiny.store(model, ids["E"], st) is None
    assert tiny.stats["bytes"] <= size // 2 and tiny.stats["entries"] == 0


def test_entry_vanishing_between_listing_and_reading_is_a_plain_miss(model, prompts, snaps, tmp_path, monkeypatch):
    c = pc(tmp_path)
    c.store(model, prompts[1], snaps[16][1])
    stale = c._entry_names()
    pc(tmp_path).clear()                               # another process evicts everything
    monkeypatch.setattr(PrefixCache, "_entry_names", lambda self: stale)
    ctx = _no_warnings()
    try:
        assert c.lookup(model, prompts[1]) == (0, None)
        assert c.evict() == 0
    finally:
        ctx.__exit__(None, None, None)


# -- (f) the longest aligned prefix wins -------------------------------------------------------------

def test_longest_aligned_prefix_is_chosen(model, prompts, snaps, tmp_path):
    c = pc(tmp_path)
    for L in (8, 16, 32):
        c.store(model, prompts[1], snaps[L][1])
    row = prompts[1]
    cases = {T: 32, 33: 32, 32: 16, 17: 16, 16: 8, 9: 8, 8: 0, 1: 0}
    for n, want in cases.items():
        L, state = c.lookup(model, row[:n])
        assert L == want, (n, L)
        assert (state is None) == (want == 0)
        if state is not None:
            assert int(state.leaves["pos"]) == want
    shared20 = row.copy()
    shared20[20:] = (shared20[20:] + 1) % 256
    assert c.lookup(model, shared20)[0] == 16
    shared7 = row.copy()
    shared7[7] = (shared7[7] + 1) % 256
    assert c.lookup(model, shared7) == (0, None)
    assert c.lookup(model, row, max_len=20)[0] == 16


def test_alignment_rules(model, prompts, snaps, tmp_path):
    assert PrefixCache(tmp_path / "a").align_for(cache_layout(CFG)) == 64        # lcm(64, 4, 8)
    assert PrefixCache(tmp_path / "a").align_for(cache_layout(preset("flash"))) == 128
    with pytest.raises(ValueError, match="multiple of the compression ratio"):
        PrefixCache(tmp_path / "b", align=6).align_for(cache_layout(CFG))
    with pytest.raises(ValueError, match="multiple of 8"):
        pc(tmp_path).store(model, prompts[1], dataclasses.replace(snaps[8][1], length=12))
    with pytest.raises(ValueError, match="position 16, not 8"):
        take_row(model, model.new_cache(1, M) | {"pos": np.array([16], np.int32)}, 0, length=8)
    assert checkpoint_lengths(40, 0, 8) == [8, 16, 32]
    assert checkpoint_lengths(40, 16, 8, "longest") == [32]
    assert checkpoint_lengths(33, 0, 8) == [8, 16, 32] and checkpoint_lengths(32, 0, 8) == [8, 16, 24]
    assert checkpoint_lengths(40, 0, 8, "none") == []


def test_bytes_per_token_presets():
    """Growth per prefix token from the pytree shapes; fp8 matches the spec 3.8 arithmetic."""
    flash, pro = preset("flash"), preset("pro")
    assert bytes_per_token(flash, "fp8") == 21 * (583 + 68) / 4 + 20 * 583 / 128
    assert bytes_per_token(pro, "fp8") == 30 * (583 + 68) / 4 + 31 * 583 / 128
    assert bytes_per_token(flash, "native", "bfloat16") == 2 * (21 * (512 + 128) / 4 + 20 * 512 / 128)


def test_generate_with_a_prefix_cache_equals_generate(model, prompts, tmp_path):
    """``V4Model.generate(..., prefix_cache=)``: the first call stores aligned prefixes, a second
    request sharing the first 24 tokens restores them (a hit); both equal plain greedy ``generate``."""
    ids = np.asarray(prompts)[:1, :30]
    other = ids.copy()
    other[0, 24:] = (other[0, 24:] + 1) % CFG.vocab_size
    cache = pc(tmp_path)
    for x in (ids, other):
        want = model.generate(x, 5, stop_tokens=())
        got = model.generate(x, 5, stop_tokens=(), prefix_cache=cache)
        np.testing.assert_array_equal(got, want)
    assert cache.stats["hits"] >= 1 and cache.stats["stores"] >= 1, cache.stats
    with pytest.raises(ValueError, match="cannot be combined"):
        model.generate(ids, 2, prefix_cache=cache, speculative="mtp")
