"""Property-based tests (hypothesis, issue #13): random draws instead of hand-picked cases.

* Config validation: every valid ``V4Config`` builds and round-trips through config.json
  (``to_hf_dict`` / ``from_dict``); every ``TrainConfig`` built from valid ``key=value`` overrides
  round-trips through ``to_json`` / ``from_json``; every invalid draw (a negative size, a head
  count that does not divide, a string / bool / float where an int goes, ...) raises
  ``ConfigError``: never another exception, never silently accepted.
* Packing and the input pipeline: no token lost or duplicated by packing, batching or resuming.
* The cache: any split of a sequence into a prefill and decode chunks (ragged rows, padded
  chunks) gives the full forward's logits.

Kept fast for CI: few examples, no deadline, and the cache test draws its chunk lengths from a
small set so that ``extend`` compiles at most a handful of shapes (the model is built once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from v4jax.config import LAYER_TYPES, ConfigError, V4Config

# =============================================================================================
# (a) config validation
# =============================================================================================

INT_FIELDS = [f.name for f in dataclasses.fields(V4Config) if str(f.type) == "int"]
FLOAT_FIELDS = [f.name for f in dataclasses.fields(V4Config) if str(f.type) == "float"]
STR_FIELDS = [f.name for f in dataclasses.fields(V4Config) if str(f.type) == "str"]
# int fields whose rule is ">= 1" (a size, a count, a ratio)
SIZE_FIELDS = ["vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
               "window_size", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
               "n_activated_experts", "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters", "hca_ratio", "max_seq_len"]


def _num(lo, hi):
    """A float in [lo, hi], sometimes given as an int (JSON writes 10000.0 as 10000)."""
    f = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    return st.one_of(f, st.integers(math.ceil(lo), math.floor(hi))) if math.ceil(lo) <= math.floor(hi) else f


@st.composite
def valid_v4(draw) -> dict:
    """Keyword arguments of a valid ``V4Config`` (every cross-field rule of ``__post_init__`` met)."""
    n_layers = draw(st.integers(1, 6))
    n_heads = draw(st.integers(1, 12))
    head_dim = draw(st.integers(2, 48))
    index_head_dim = draw(st.integers(2, 48))
    rope = 2 * draw(st.integers(1, min(head_dim, index_head_dim) // 2))
    experts = draw(st.integers(1, 16))
    vocab = draw(st.integers(2, 70000))
    return dict(
        vocab_size=vocab, dim=draw(st.integers(1, 512)), n_layers=n_layers,
        layer_types=tuple(draw(st.lists(st.sampled_from(LAYER_TYPES), min_size=n_layers, max_size=n_layers))),
        csa_ratio=4, hca_ratio=draw(st.sampled_from([1, 2, 3, 8, 16, 32, 128])),
        n_hash_layers=draw(st.integers(0, n_layers)), n_heads=n_heads, head_dim=head_dim, rope_head_dim=rope,
        q_lora_rank=draw(st.integers(1, 256)),
        o_groups=draw(st.sampled_from([g for g in range(1, n_heads + 1) if n_heads % g == 0])),
        o_lora_rank=draw(st.integers(1, 256)), window_size=draw(st.integers(1, 256)),
        index_n_heads=draw(st.integers(1, 16)), index_head_dim=index_head_dim, index_topk=draw(st.integers(1, 2048)),
        n_routed_experts=experts, n_shared_experts=draw(st.integers(0, 2)),
        n_activated_experts=draw(st.integers(1, experts)), moe_inter_dim=draw(st.integers(1, 512)),
        score_func=draw(st.sampled_from(["sqrtsoftplus", "sigmoid", "softmax"])),
        route_scale=draw(_num(0.01, 8)), swiglu_limit=draw(_num(0.01, 100)), hc_mult=draw(st.integers(1, 4)),
        hc_sinkhorn_iters=draw(st.integers(1, 30)), hc_eps=draw(_num(0, 1e-3)), norm_eps=draw(_num(1e-12, 1e-2)),
        rope_theta=draw(_num(1.5, 1e7)), compress_rope_theta=draw(_num(1.5, 1e7)),
        rope_factor=draw(_num(1, 64)), original_seq_len=draw(st.integers(0, 1 << 17)),
        beta_fast=draw(_num(0.01, 64)), beta_slow=draw(_num(0.01, 64)), max_seq_len=draw(st.integers(1, 1 << 21)),
        n_mtp_layers=draw(st.integers(0, 1)), bos_token_id=draw(st.integers(0, vocab - 1)),
        eos_token_id=draw(st.integers(0, vocab - 1)), dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        param_dtype=draw(st.sampled_from(["float32", "bfloat16"])), name=draw(st.text(max_size=8)),
    )


def _wrong_type(field: str, good):
    """Values of the wrong type for ``field`` (whose valid value is ``good``)."""
    if field in INT_FIELDS:
        return st.sampled_from([str(good), float(good), True, False, None, [good], f"{good}x"])
    if field in FLOAT_FIELDS:
        return st.sampled_from([str(good), True, None, [good], float("nan"), float("inf"), "1e-3"])
    return st.sampled_from([1, 2.5, True, None, [good], b"x"])


@st.composite
def invalid_v4(draw) -> tuple[dict, str]:
    """(kwargs breaking exactly one rule, the field the error must name)."""
    kw = draw(valid_v4())
    kind = draw(st.sampled_from(["size", "type", "divide", "experts", "layers", "rope", "token", "choice"]))
    if kind == "size":
        f = draw(st.sampled_from(SIZE_FIELDS))
        kw[f] = draw(st.integers(-(1 << 40), 0))
    elif kind == "type":
        f = draw(st.sampled_from(INT_FIELDS + FLOAT_FIELDS + [s for s in STR_FIELDS if s != "name"] + ["name"]))
        kw[f] = draw(_wrong_type(f, kw[f]))
    elif kind == "divide":                                   # o_groups must divide n_heads
        f = "o_groups"
        kw[f] = draw(st.sampled_from([g for g in range(2, 2 * kw["n_heads"] + 2) if kw["n_heads"] % g]))
    elif kind == "experts":
        f = "n_activated_experts"
        kw[f] = kw["n_routed_experts"] + draw(st.integers(1, 8))
    elif kind == "layers":
        f = "layer_types"
        kw[f] = draw(st.one_of(
            st.just(kw[f] + ("window",)),                                            # one entry too many
            st.just(kw[f][:-1] + ("linear",)),                                        # unknown type
            st.sampled_from([5, None, ("window", 3)])))                              # not names
        if kw[f] == () or kw[f] is None:
            kw[f] = 5
    elif kind == "rope":
        f = "rope_head_dim"
        kw[f] = draw(st.sampled_from([kw[f] + 1, -kw[f], 0, 2 * max(kw["head_dim"], kw["index_head_dim"]) + 2]))
    elif kind == "token":
        f = draw(st.sampled_from(["bos_token_id", "eos_token_id"]))
        kw[f] = draw(st.sampled_from([-1, kw["vocab_size"], kw["vocab_size"] + 7]))
    else:
        f = draw(st.sampled_from(["score_func", "dtype", "param_dtype", "n_mtp_layers", "csa_ratio", "hca_ratio",
                                  "rope_factor", "rope_theta", "norm_eps", "swiglu_limit", "n_hash_layers"]))
        kw[f] = {"score_func": "relu", "dtype": "float16", "param_dtype": "int8", "n_mtp_layers": 2, "csa_ratio": 8,
                 "hca_ratio": 4, "rope_factor": 0.5, "rope_theta": 1.0, "norm_eps": 0.0, "swiglu_limit": -1.0,
                 "n_hash_layers": kw["n_layers"] + 1}[f]
    return kw, f


def _yarn_normalised(cfg: V4Config) -> V4Config:
    """What config.json keeps of the YaRN fields: without YaRN (factor 1 or original_seq_len 0)
    it writes no rope_scaling, and reading back gives factor 1, original_seq_len 0 and the
    default betas (the same rotary frequencies)."""
    if cfg.rope("hca").uses_yarn:
        return cfg
    return cfg.replace(rope_factor=1.0, original_seq_len=0, beta_fast=32.0, beta_slow=1.0)


@settings(max_examples=60, deadline=None)
@given(valid_v4())
def test_valid_v4config_builds_and_round_trips(kw):
    cfg = V4Config(**kw)
    for f in FLOAT_FIELDS:                                   # ints given for float fields are stored as floats
        assert type(getattr(cfg, f)) is float and getattr(cfg, f) == kw[f]
    d = json.loads(json.dumps(cfg.to_hf_dict()))
    # config.json carries the architecture; name and the compute dtypes are the loader's choice
    back = V4Config.from_dict(d, name=cfg.name, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    assert back == _yarn_normalised(cfg)
    assert V4Config(**dataclasses.asdict(cfg)) == cfg       # the TrainConfig form (train_config.json)


@settings(max_examples=80, deadline=None)
@given(invalid_v4())
def test_invalid_v4config_raises_config_error_naming_the_field(case):
    kw, field = case
    with pytest.raises(ConfigError, match=field):
        V4Config(**kw)


# config.json keys and values that are wrong for them: from_dict raises ConfigError, whatever the value
_BAD_INT = ["64", "x", 64.5, True, [1, 2], {"a": 1}, -3]
_BAD_FLOAT = ["x", "1e-3", True, [1.0], {"a": 1}, -3, 0]
_BAD_JSON = {
    **{k: _BAD_INT for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                             "qk_rope_head_dim", "q_lora_rank", "o_groups", "sliding_window", "index_topk",
                             "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "hc_mult",
                             "max_position_embeddings", "num_nextn_predict_layers")},
    **{k: _BAD_FLOAT for k in ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "compress_rope_theta")},
    "eos_token_id": ["1", 1.5, True, [], {"a": 1}, -3],
    "scoring_func": [5, True, ["sigmoid"], "relu"],
    "layer_types": ["x", 5, True, [1, 2], {"a": 1}, ["linear_attention", "sliding_attention"]],
    "mlp_layer_types": ["x", 5, True, ["moe", "hash_moe"], {"a": 1}],
    "compress_rates": ["x", 5, [4, 8], {"heavily_compressed_attention": "x"},
                       {"heavily_compressed_attention": 8.5}, {"compressed_sparse_attention": 8}],
    "rope_scaling": ["x", 5, [1], {"type": "linear", "factor": 2.0}, {"factor": 4.0},
                     {"type": "yarn", "factor": "x", "original_max_position_embeddings": 64}],
    "rope_parameters": ["x", [1], {"compress": {"rope_type": "dynamic"}}],
}


@settings(max_examples=60, deadline=None)
@given(valid_v4(), st.sampled_from([(k, v) for k, vs in _BAD_JSON.items() for v in vs]))
def test_from_dict_refuses_every_bad_value(kw, case):
    key, value = case
    d = json.loads(json.dumps(V4Config(**kw).to_hf_dict()))
    d[key] = value
    with pytest.raises(ConfigError):
        V4Config.from_dict(d)


# -- TrainConfig overrides --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run():
    from v4jax.train.config import train_preset

    return train_preset("tiny")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _assign(key, value, raw: bool) -> str:
    """``key=value`` as the CLI's ``--set`` takes it: JSON, or (``raw``) bare text for a string
    that does not read as JSON (``--set tokenizer=byte``; ``"64"`` stays quoted)."""
    bare = raw and isinstance(value, str) and not _is_json(value)
    return f"{key}={value}" if bare else f"{key}={json.dumps(value)}"


@st.composite
def valid_overrides(draw) -> dict:
    """``{key: value}`` overrides that keep a tiny run valid."""
    max_seq = draw(st.integers(16, 8192))
    out = {
        "seq_len": draw(st.integers(2, max_seq - 1)), "model.max_seq_len": max_seq,
        "batch_size": draw(st.integers(1, 64)), "seed": draw(st.integers(0, 2 ** 31)),
        "total_steps": draw(st.integers(1, 10 ** 6)), "log_every": draw(st.integers(1, 100)),
        "mtp_weight": draw(st.floats(0, 2)), "balance_weight": draw(st.floats(0, 1e-2)),
        "eval_batches": draw(st.one_of(st.none(), st.integers(1, 50))),
        "async_checkpointing": draw(st.booleans()), "tokenizer": draw(st.sampled_from(["bpe", "byte"])),
        "dense_attention_steps": draw(st.integers(0, 100)),
        "model.window_size": draw(st.integers(1, 256)), "model.index_topk": draw(st.integers(1, 64)),
        "model.dtype": draw(st.sampled_from(["float32", "bfloat16"])),
        "model.rope_theta": draw(st.floats(2, 1e6)),
        "optim.peak_lr": draw(st.floats(3e-4, 1e-1)), "optim.weight_decay": draw(st.floats(0, 1)),
        "optim.clip": draw(st.one_of(st.none(), st.floats(0.1, 10))),
        "runtime.attention": draw(st.sampled_from(["xla", "reference"])),
        "runtime.remat": draw(st.sampled_from(["none", "full", "save_matmuls"])),
        "runtime.unroll": draw(st.integers(0, 4)), "runtime.q_chunk": draw(st.one_of(st.none(), st.integers(1, 512))),
    }
    keys = draw(st.lists(st.sampled_from(sorted(out)), unique=True, max_size=8))
    if "seq_len" in keys or "model.max_seq_len" in keys:     # they constrain each other: set both
        keys = sorted(set(keys) | {"seq_len", "model.max_seq_len"})
    return {k: out[k] for k in keys}


def _get(cfg, key):
    part, _, sub = key.partition(".")
    return getattr(getattr(cfg, part), sub) if sub else getattr(cfg, key)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_overrides(), st.booleans())
def test_valid_train_overrides_build_and_round_trip(tiny_run, kv, raw):
    from v4jax.train.config import TrainConfig

    cfg = tiny_run.override([_assign(k, v, raw) for k, v in kv.items()])
    for k, v in kv.items():
        assert _get(cfg, k) == v, k
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "train_config.json")
        cfg.to_json(path)
        assert TrainConfig.from_json(path) == cfg


# Wrong values that every config level already refuses.
_BAD_TRAIN = {
    "batch_size": [0, -4, 2.5, "8", "abc", [8], True], "seq_len": [0, 1, 4096, 10 ** 6, 3.0, "256", True],
    "total_steps": [0, 1.5, "x"], "dense_attention_steps": [-1, 0.5], "eval_fraction": [0, 1, 1.5, "x"],
    "eval_batches": [0, -1], "tokenizer": [5, "nope"], "text_field": ["", 3], "mesh": ["data=x", "gpu=2"],
    "model.dim": [-64, 0, 64.0, "64", True, None], "model.n_heads": [3, 0, "4"], "model.o_groups": [3],
    "model.layer_types": [["window"], ["window", "x", "hca", "csa", "hca", "csa"], 5],
    "model.n_activated_experts": [17, True], "model.dtype": ["float16", 32], "model.rope_theta": ["x", True],
    "model.vocab_size": [0, 4096.0], "model.norm_eps": [0, "tiny"],
    "optim.peak_lr": [0, -1, "x", True], "optim.warmup_steps": [True, 1.5, 100], "optim.total_steps": ["110"],
    "optim.clip": [0, "x", True], "optim.muon_bucket": [1, "yes"], "optim.muon_balance": [0.5, "x"], "optim.adam_b1": [1.0, -0.1],
    "runtime.attention": ["flash", 5], "runtime.moe": ["fast"], "runtime.remat": [True],
    "runtime.unroll": [-1, True, 1.5], "runtime.q_chunk": [0, 2.5, "8", True],
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_overrides(), st.sampled_from([(k, v) for k, vs in _BAD_TRAIN.items() for v in vs]), st.booleans())
def test_invalid_train_overrides_raise_config_error(tiny_run, good, bad, raw):
    """Valid overrides plus one bad value (applied last) raise ConfigError, nothing else."""
    key, value = bad
    tied = {"seq_len", "model.max_seq_len"} if key == "seq_len" else {key}   # 4096 is bad for max_seq_len 4096
    sets = [_assign(k, v, raw) for k, v in good.items() if k not in tied] + [_assign(key, value, raw)]
    with pytest.raises(ConfigError):
        tiny_run.override(sets)


# =============================================================================================
# (b) packing, batching, resume
# =============================================================================================

@st.composite
def documents(draw, row_len: int, min_docs: int = 0):
    """Documents of 1 .. 3 * row_len + 2 tokens with arbitrary ids (pad id 0 included: the
    packer's output is read through its segment ids, never by value)."""
    n = draw(st.integers(min_docs, 25))
    lens = draw(st.lists(st.integers(1, 3 * row_len + 2), min_size=n, max_size=n))
    return [draw(st.lists(st.integers(0, 50), min_size=k, max_size=k)) for k in lens]


def _pieces(tokens, seg):
    """The packed segments, in order (row by row, segment by segment), checking each row's layout:
    segment ids 1, 2, ... in contiguous runs, padding (0) only at the end."""
    out = []
    for tok, s in zip(tokens, seg):
        used = int((s > 0).sum())
        assert used >= 1 and (s[used:] == 0).all() and (s[:used] > 0).all()
        assert s[0] == 1 and (np.diff(s[:used]) >= 0).all() and (np.diff(s[:used]) <= 1).all()
        out += [tok[s == k].tolist() for k in range(1, int(s.max()) + 1)]
    return out


def _check_packed(docs, tokens, seg, row_len):
    assert tokens.shape == seg.shape == (len(tokens), row_len) and tokens.dtype == seg.dtype == np.int32
    pieces, i = _pieces(tokens, seg), 0
    doc_starting_at = {}                                     # piece index -> the document it starts
    for k, d in enumerate(docs):                             # each document once, in order, in pieces
        doc_starting_at[i] = k
        got, first = [], i
        while len(got) < len(d):
            got += pieces[i]
            i += 1
        assert got == list(d)
        if len(d) <= row_len:                                # a document that fits a row is never split
            assert i == first + 1
    assert i == len(pieces)                                  # and nothing else
    # greedy: a row is padded only when the next document, a short one, does not fit its free space
    starts = np.cumsum([int(s.max()) for s in seg])          # index of the first piece of row r + 1
    for r in range(len(tokens) - 1):
        free = int((seg[r] == 0).sum())
        if free:
            k = doc_starting_at.get(int(starts[r]))
            assert k is not None and free < len(docs[k]) <= row_len, (r, free)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 20))
def test_packing_keeps_every_token_once_in_order(data, row_len):
    from v4jax.data.packing import RowPacker, pack_documents

    docs = data.draw(documents(row_len))
    tokens, seg = pack_documents(docs, row_len, pad_id=0)
    _check_packed(docs, tokens, seg, row_len)
    # the streaming packer gives the same rows whatever the moment they are collected
    p, rows = RowPacker(row_len), []
    for d in docs:
        rows += p.add(d)
    rows += p.finish()
    assert len(rows) == len(tokens)
    for (t, s), t2, s2 in zip(rows, tokens, seg):
        np.testing.assert_array_equal(t, t2)
        np.testing.assert_array_equal(s, s2)


def _iterator(tokens, seg, batch_size, *, seed=0, shuffle=True, num_epochs=None, rows=None):
    from v4jax.data.pipeline import ArrayRows, DataIterator

    settings_ = {"split": "train", "seq_len": tokens.shape[1] - 1, "batch_size": batch_size, "seed": seed,
                 "shuffle": shuffle, "num_epochs": num_epochs, "shard_index": 0, "num_shards": 1,
                 "drop_remainder": False, "data": "test"}
    return DataIterator(ArrayRows(tokens, seg), settings=settings_, pad_id=0, rows=rows)


@st.composite
def packed(draw):
    """(documents, their packed rows): at least one row."""
    from v4jax.data.packing import pack_documents

    row_len = draw(st.integers(2, 12))
    docs = draw(documents(row_len, min_docs=1))
    tokens, seg = pack_documents(docs, row_len)
    return docs, tokens, seg


@settings(max_examples=30, deadline=None)
@given(packed(), st.integers(1, 9), st.integers(0, 3), st.booleans())
def test_one_epoch_of_batches_holds_every_row_once(case, batch_size, seed, shuffle):
    docs, tokens, seg = case
    batches = list(_iterator(tokens, seg, batch_size, seed=seed, shuffle=shuffle, num_epochs=1))
    assert len(batches) == -(-len(tokens) // batch_size)
    for b in batches:
        assert b["tokens"].shape == b["segment_ids"].shape == (batch_size, tokens.shape[1])
    got_t = np.concatenate([b["tokens"] for b in batches])
    got_s = np.concatenate([b["segment_ids"] for b in batches])
    real = got_s.max(axis=1) > 0                             # the short last batch is filled with empty rows
    assert real.sum() == len(tokens) and real[:len(tokens)].all()
    got_t, got_s = got_t[real], got_s[real]
    if not shuffle:                                          # in order: the documents come back as they were
        _check_packed(docs, got_t, got_s, tokens.shape[1])
    rows_in = sorted(np.concatenate([tokens, seg], 1).tolist())
    assert sorted(np.concatenate([got_t, got_s], 1).tolist()) == rows_in
    # endless: the first epoch of the stream is the same set of rows, and so is the second
    endless = _iterator(tokens, seg, batch_size, seed=seed, shuffle=shuffle)
    n = len(tokens)
    stream = np.concatenate([np.concatenate([b["tokens"], b["segment_ids"]], 1)
                             for b in (next(endless) for _ in range(-(-2 * n // batch_size)))])
    assert sorted(stream[:n].tolist()) == rows_in and sorted(stream[n:2 * n].tolist()) == rows_in


@settings(max_examples=30, deadline=None)
@given(st.data(), packed(), st.integers(1, 6), st.integers(0, 5), st.sampled_from([None, 1, 2]))
def test_resume_gives_the_uninterrupted_batches(data, case, batch_size, seed, epochs):
    """Stop after k batches, save get_state() (through JSON), build a fresh iterator, set_state():
    the batches that follow are those of the uninterrupted iterator; the processes' row slices
    (``rows=(lo, hi)``) put together are the global batch."""
    _, tokens, seg = case
    total = 3 * -(-len(tokens) // batch_size) if epochs is None else -(-epochs * len(tokens) // batch_size)
    ref = [b for _, b in zip(range(total), _iterator(tokens, seg, batch_size, seed=seed, num_epochs=epochs))]
    assert len(ref) == total
    k = data.draw(st.integers(0, total), label="stop after")
    it = _iterator(tokens, seg, batch_size, seed=seed, num_epochs=epochs)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = _iterator(tokens, seg, batch_size, seed=seed, num_epochs=epochs)
    resumed.set_state(state)
    rest = [b for _, b in zip(range(total - k), resumed)]
    assert len(rest) == total - k
    for a, b in zip(rest, ref[k:]):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
    if epochs is not None:                                   # a finite iterator ends where it should
        assert next(resumed, None) is None
    if batch_size > 1:
        lo = data.draw(st.integers(1, batch_size - 1), label="process split")
        parts = [_iterator(tokens, seg, batch_size, seed=seed, num_epochs=epochs, rows=r)
                 for r in ((0, lo), (lo, batch_size))]
        for b in ref[:3]:
            got = [next(p) for p in parts]
            np.testing.assert_array_equal(np.concatenate([g["tokens"] for g in got]), b["tokens"])
            np.testing.assert_array_equal(np.concatenate([g["segment_ids"] for g in got]), b["segment_ids"])


# =============================================================================================
# (c) the cache: any split of a sequence gives the forward's logits
# =============================================================================================

T_CACHE, B_CACHE = 32, 2        # window 8, CSA ratio 4, HCA ratio 8: every layer crosses block boundaries
# Every chunk length compiles extend once (~2.5 s on CI's CPU): keep the set small. 3 and 5 are
# prime to the ratios 4 and 8, so chunks start and end at every offset inside a compressed block;
# rows also take fewer real tokens than the chunk (right padding). Hypothesis shrinks towards the
# first entry: the simplest plan is a few whole chunks of 8.
CHUNKS = (8, 5, 3, 1)


@pytest.fixture(scope="module")
def cache_model():
    from conftest import random_variables, small_config

    import v4jax

    cfg = small_config(max_seq_len=64)
    return v4jax.V4Model(cfg, random_variables(cfg, seed=5))


@st.composite
def split_plan(draw):
    """A prefill (``chunk_size`` from CHUNKS, a multiple of it long, right-padded rows of their own
    lengths), then steps: a chunk length from CHUNKS and each row's real tokens in it (ragged rows,
    padding; a step of one token for both rows goes through ``decode_step``)."""
    c = draw(st.sampled_from(CHUNKS), label="prefill chunk_size")
    P = c * draw(st.integers(1, T_CACHE // c), label="prefill chunks")
    first = [P - draw(st.integers(0, P - 1), label=f"row {b} prompt shortfall") for b in range(B_CACHE)]
    pos, steps = list(first), []
    while min(pos) < T_CACHE:
        n = draw(st.sampled_from(CHUNKS), label="chunk")
        lens = []
        for p in pos:                                        # each row: a full chunk, or fewer real tokens
            room = min(n, T_CACHE - p)
            lens.append(room - draw(st.integers(0, room), label="row shortfall"))
        if sum(lens):
            steps.append((n, lens))
            pos = [p + k for p, k in zip(pos, lens)]
    return c, P, first, steps


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(split_plan(), st.lists(st.integers(0, 255), min_size=B_CACHE * T_CACHE, max_size=B_CACHE * T_CACHE))
def test_any_prefill_decode_split_equals_the_forward(cache_model, plan, flat_ids):
    from v4jax.inputs import InputError

    m = cache_model
    c, P, first, steps = plan
    ids = np.asarray(flat_ids, np.int32).reshape(B_CACHE, T_CACHE)
    full = np.asarray(m(ids))
    got = np.full(full.shape, np.nan, np.float32)
    logits, cache = m.prefill(ids[:, :P], max_len=T_CACHE, chunk_size=c, lengths=first)
    logits = np.asarray(logits)
    pos = list(first)
    for b in range(B_CACHE):
        got[b, :pos[b]] = logits[b, :pos[b]]
    for n, lens in steps:
        chunk = np.zeros((B_CACHE, n), np.int32)             # right padding: any id, here 0
        for b in range(B_CACHE):
            chunk[b, :lens[b]] = ids[b, pos[b]:pos[b] + lens[b]]
        if n == 1 and lens == [1] * B_CACHE:
            nxt, lg, cache = m.decode_step(chunk[:, 0], cache)
            lg = np.asarray(lg)[:, None]
            np.testing.assert_array_equal(np.asarray(nxt), lg[:, 0].argmax(-1))
        else:
            lg, cache = m.extend(chunk, cache, lengths=lens)
            lg = np.asarray(lg)
        for b in range(B_CACHE):
            got[b, pos[b]:pos[b] + lens[b]] = lg[b, :lens[b]]
        pos = [p + k for p, k in zip(pos, lens)]
    assert pos == [T_CACHE] * B_CACHE and (np.asarray(cache["pos"]) == T_CACHE).all()
    err = np.abs(got - full).max()                           # NaN (a position never filled) fails too
    assert err <= 1e-4 * np.abs(full).max(), err
    with pytest.raises(InputError, match=f"cache holds {T_CACHE} tokens"):   # the cache is full now
        m.decode_step(ids[:, 0], cache)
