"""Bad input at every model entry point (issue #13): one clear ``InputError`` (a ``ValueError``)
naming the value and the limit, raised before anything is compiled. The pure Flax module raises a
``ValueError`` at trace time (``T`` is static there).

Every check here is eager (host side): nothing in this file compiles a forward, so it runs in a few
seconds. The model is tiny with ``max_seq_len = 64``."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables, small_config

import v4jax
from v4jax.inputs import InputError, check_token_ids
from v4jax.model.transformer import Transformer, init_cache

MAX = 64
VOCAB = 256


@pytest.fixture(scope="module")
def m():
    cfg = small_config(max_seq_len=MAX)
    return v4jax.V4Model(cfg, random_variables(cfg, seed=3))


def ids_of(T, B=1, value=1):
    return np.full((B, T), value, np.int32)


def raises(match):
    """``pytest.raises(InputError)`` whose message contains ``match`` literally."""
    return pytest.raises(InputError, match=re.escape(match))


# ---------------------------------------------------------------------------------------- length

def test_forward_rejects_sequences_longer_than_max_seq_len(m):
    too_long = ids_of(MAX + 1)
    with raises(f"sequence length {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        m(too_long)
    with raises(f"sequence length {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        m.forward(too_long)
    with raises(f"sequence length {2 * MAX}"):
        m.forward(ids_of(2 * MAX, B=2), segment_ids=np.ones((2, 2 * MAX), np.int32))


def test_module_rejects_too_long_at_trace_time(m):
    """The pure path (what the training step applies) checks the static T; T = max_seq_len traces."""
    mod, v = m.module, m.variables
    with pytest.raises(ValueError, match=f"sequence length {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        jax.eval_shape(lambda x: mod.apply(v, x), jnp.zeros((1, MAX + 1), jnp.int32))
    with pytest.raises(ValueError, match=f"sequence length {MAX + 1} exceeds"):
        Transformer(m.cfg).init(jax.random.key(0), jnp.zeros((1, MAX + 1), jnp.int32))
    cache = init_cache(m.cfg, 1, MAX)
    with pytest.raises(ValueError, match=f"chunk length {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        jax.eval_shape(lambda x, c: mod.apply(v, x, c, method="extend"), jnp.zeros((1, MAX + 1), jnp.int32), cache)
    out = jax.eval_shape(lambda x: mod.apply(v, x, with_mtp=True), jnp.zeros((1, MAX), jnp.int32))
    assert out["logits"].shape == (1, MAX, VOCAB) and out["mtp_logits"].shape == (1, MAX, VOCAB)


def test_new_cache_bounds(m):
    with raises(f"max_len {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        m.new_cache(1, MAX + 1)
    with raises("max_len must be an integer >= 1, got 0"):
        m.new_cache(1, 0)
    with raises("max_len must be an integer >= 1, got 8.0"):
        m.new_cache(1, 8.0)
    with raises("batch must be an integer >= 1, got True"):
        m.new_cache(True, 8)
    with raises("cache format must be 'native' or 'fp8', got 'fp4'"):
        m.new_cache(1, 8, fmt="fp4")
    with pytest.raises(ValueError, match=f"max_len must be in \\[1, {MAX}\\], got {MAX + 1}"):
        init_cache(m.cfg, 1, MAX + 1)


def test_extend_rejects_positions_past_the_cache(m):
    cache = m.new_cache(2, 8)
    with raises("cache holds 8 tokens (max_len): row 0 is at position 0 and cannot add 9 more (9 > 8)"):
        m.extend(ids_of(9, B=2), cache)
    half = {**cache, "pos": jnp.asarray([3, 5], jnp.int32)}         # as after earlier chunks
    with raises("row 1 is at position 5 and cannot add 4 more (9 > 8)"):
        m.extend(ids_of(4, B=2), half)
    # padded tokens (beyond lengths) are never stored: the real ones fit, no error is raised here
    # (the call would compile, so only the check is run)
    m._check_room(half, np.array([3, 3], np.int32))
    with raises(f"sequence length {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        m.extend(ids_of(MAX + 1, B=2), cache, lengths=[1, 1])
    forged = {**cache, "max_len": jnp.asarray(2 * MAX, jnp.int32)}    # a cache made for a longer model
    with raises(f"the cache holds {2 * MAX} tokens, more than the model's max_seq_len {MAX}"):
        m.extend(ids_of(1, B=2), forged)
    with raises("lengths must be 2 integers in [0, 4]"):
        m.extend(ids_of(4, B=2), cache, lengths=[5, 1])
    with raises("lengths must be 2 integers in [0, 4]"):
        m.extend(ids_of(4, B=2), cache, lengths=[2.5, 1])
    with raises("batch 1 does not match the cache's batch 2"):
        m.extend(ids_of(4, B=1), cache)


def test_prefill_bounds(m):
    with raises(f"sequence length {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        m.prefill(ids_of(MAX + 1))
    with raises(f"max_len {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        m.prefill(ids_of(8), max_len=MAX + 1)
    with raises("prefill: max_len 4 is shorter than the longest prompt (6 tokens)"):
        m.prefill(ids_of(8, B=2), max_len=4, lengths=[6, 2])
    with raises("lengths must be 2 integers in [1, 8], got [0, 8]"):
        m.prefill(ids_of(8, B=2), lengths=[0, 8])
    with raises("chunk_size must be None or an integer >= 1, got 0"):
        m.prefill(ids_of(8), chunk_size=0)


def test_generate_bounds(m):
    with raises(f"prompt length 60 + max_new_tokens 5 = 65 exceeds the model's max_seq_len {MAX}"):
        m.generate(ids_of(60), 5)
    with raises(f"sequence length {MAX + 1} exceeds the model's max_seq_len {MAX}"):
        m.generate(ids_of(MAX + 1), 1)
    for bad in (0, 2.5, True, "3"):
        with raises(f"max_new_tokens must be an integer >= 1, got {bad!r}"):
            m.generate(ids_of(4), bad)


def test_decode_step_past_the_cache(m):
    full = {**m.new_cache(2, 8), "pos": jnp.asarray([7, 8], jnp.int32)}
    with raises("cache holds 8 tokens (max_len): row 1 is at position 8 and cannot add 1 more (9 > 8)"):
        m.decode_step(np.array([1, 2], np.int32), full)
    assert not full["pos"].is_deleted()                               # refused before the cache was donated


# -------------------------------------------------------------------------------- token ids, dtype

def _entry_points(m):
    """Each entry point as ``f(ids [2, T])``; the call must raise before anything is compiled."""
    return {
        "call": lambda x: m(x),
        "forward": lambda x: m.forward(x),
        "extend": lambda x: m.extend(x, m.new_cache(2, 16)),
        "prefill": lambda x: m.prefill(x),
        "generate": lambda x: m.generate(x, 2),
        "decode_step": lambda x: m.decode_step(x[:, 0], m.new_cache(2, 16)),
    }


@pytest.mark.parametrize("entry", ["call", "forward", "extend", "prefill", "generate", "decode_step"])
@pytest.mark.parametrize("bad", [VOCAB, -1, 10 ** 6])
def test_every_entry_point_checks_token_ids(m, entry, bad):
    ids = ids_of(4, B=2)
    ids[1, 0] = bad
    where = "(1,)" if entry == "decode_step" else "(1, 0)"       # decode_step takes one token per row
    with raises(f"token id {bad} at position {where} is outside the vocabulary [0, {VOCAB})"):
        _entry_points(m)[entry](ids)


@pytest.mark.parametrize("entry", ["call", "forward", "extend", "prefill", "generate", "decode_step"])
def test_every_entry_point_checks_dtype(m, entry):
    with raises("token ids must have an integer dtype, got float32"):
        _entry_points(m)[entry](np.ones((2, 4), np.float32))
    with raises("token ids must have an integer dtype, got bool"):
        _entry_points(m)[entry](np.ones((2, 4), bool))


def test_rank_shape_and_type(m):
    with raises("token ids must have rank 2 [batch, seq], got shape (4,)"):
        m(np.ones(4, np.int32))
    with raises("token ids must have rank 2 [batch, seq], got shape (1, 2, 2)"):
        m(np.ones((1, 2, 2), np.int32))
    with raises("token ids must be non-empty, got shape (1, 0)"):
        m(np.ones((1, 0), np.int32))
    with raises("token ids must be an integer array [batch, seq], got str"):
        m("hello")
    with raises("decode_step needs tokens of shape (2,) for this cache, got (1,)"):
        m.decode_step(np.ones(1, np.int32), m.new_cache(2, 8))
    with raises("segment_ids must be integers of the ids' shape (2, 4), got int64 (2, 3)"):
        m.forward(ids_of(4, B=2), segment_ids=np.ones((2, 3), np.int64))
    # lists are fine, and the id check covers the whole array
    assert check_token_ids([[0, VOCAB - 1]], VOCAB).dtype == jnp.int32


def test_generate_command_reports_bad_input_as_a_usage_error(capsys):
    """``v4jax-generate`` turns the model's InputError into a usage error (exit 2), no traceback."""
    import os

    from v4jax.inference.generate_cli import main

    path = os.path.join(os.path.dirname(__file__), "fixtures", "hf_mixed")      # vocab 256, max_seq_len 4096
    with pytest.raises(SystemExit) as e:
        main([path, "--prompt-ids", "5 17 4000", "--max-new-tokens", "3"])
    assert e.value.code == 2
    assert "token id 4000 at position (0, 2) is outside the vocabulary [0, 256)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([path, "--prompt-ids", "5 17", "--max-new-tokens", "5000"])
    err = capsys.readouterr().err
    assert "prompt length 2 + max_new_tokens 5000 = 5002 exceeds the model's max_seq_len 4096" in err
