"""Training input pipeline: TFDS builder (offline, no TensorFlow), tokenizers, packing, loss masks, resumable iterator."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import random
import socket

import numpy as np
import pytest

from v4jax.data import (ByteTokenizer, default_tokenizer, ensure_prepared, loss_masks, make_dataset,
                        make_eval_dataset, pack_documents, packed_split, prepare, read_corpus, segment_positions,
                        split_of, tokenized_split, train_bpe)
from v4jax.data.corpus import CORPUS_DIR

SEQ = 256                     # the tiny preset's training length


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Prepare the TFDS dataset once into a temporary data_dir with every network connection refused."""
    d = tmp_path_factory.mktemp("v4jax_tfds")

    def refuse(*a, **k):
        raise OSError("network access attempted during prepare")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    try:
        ensure_prepared(d)
    finally:
        mp.undo()
    return d


# ------------------------------------------------------------------------------------------------ builder, corpus

def test_tensorflow_not_installed():
    assert importlib.util.find_spec("tensorflow") is None
    with pytest.raises(ImportError):
        importlib.import_module("tensorflow")


def test_builder_prepares_offline_and_reads_without_tf(data_dir):
    builder = ensure_prepared(data_dir)
    files = sorted(p.name for p in (data_dir / "v4jax_text" / "1.0.0").iterdir())
    assert "dataset_info.json" in files and any(f.startswith("v4jax_text-train.array_record") for f in files)
    corpus = read_corpus()
    names = {}
    for split in ("train", "validation"):
        src = builder.as_data_source(split=split)
        want = {d["name"]: d["text"] for d in corpus if split_of(d["name"]) == split}
        assert len(src) == len(want) == builder.info.splits[split].num_examples
        got = {src[i]["name"].decode(): src[i]["text"].decode() for i in range(len(src))}
        assert got == want                                   # every document, byte for byte
        names[split] = set(got)
    assert not names["train"] & names["validation"]
    assert names["train"] | names["validation"] == {d["name"] for d in corpus}
    assert 0.03 < len(names["validation"]) / len(corpus) < 0.12
    assert builder.info.metadata["corpus_sha256"] == json.loads((CORPUS_DIR / "manifest.json").read_text())["sha256"]


def test_corpus_shipped_and_small():
    manifest = json.loads((CORPUS_DIR / "manifest.json").read_text())
    size = (CORPUS_DIR / manifest["file"]).stat().st_size
    assert size == manifest["compressed_bytes"] and size < 2_000_000
    docs = read_corpus()
    assert [d["name"] for d in docs] == sorted(d["name"] for d in docs)
    for split in ("train", "validation"):
        assert manifest["splits"][split]["docs"] == sum(split_of(d["name"]) == split for d in docs)
    assert (CORPUS_DIR / "LICENSE-PSF.txt").exists() and (CORPUS_DIR / "NOTICE.md").exists()


# ------------------------------------------------------------------------------------------------------ tokenizers

def test_bpe_vocab_and_special_ids():
    tok = default_tokenizer()
    assert tok.vocab_size == 4096
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.decode([0, 1, 2]) == "<|pad|><|bos|><|eos|>"
    # special-token strings inside text stay text
    ids = tok.encode("x = '<|eos|>' + '<|pad|>'")
    assert not set(ids) & {0, 1, 2} and tok.decode(ids) == "x = '<|eos|>' + '<|pad|>'"
    assert json.loads((CORPUS_DIR / "manifest.json").read_text())["tokenizer"] == tok.fingerprint


def _random_strings(seed: int, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = ["", " ", "\x00", "\r\n\t  \n", "é", "e\u0301", "🙂👍🏽", "中文字符", "\U0010FFFF", "a" * 1000, " " * 37]
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append("".join(chr(rng.randint(lo, hi)) if rng.random() < 0.5 else rng.choice(" \n\tab_(){}:")
                           for _ in range(rng.randint(1, 40))))
    out.append(bytes(range(256)).decode("latin-1"))          # every byte value as a code point
    out.append(bytes(rng.randrange(256) for _ in range(4000)).decode("utf-8", errors="replace"))
    return out


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_round_trip(kind):
    tok = default_tokenizer() if kind == "bpe" else ByteTokenizer()
    texts = [d["text"] for d in read_corpus("validation")] + _random_strings(0)
    for s, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == tok.encode(s)
        assert all(3 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    if kind == "bpe":                                  # it compresses code: ~3.6 UTF-8 bytes per token
        val = texts[:len(read_corpus("validation"))]
        n_bytes, n_tok = sum(len(t.encode()) for t in val), sum(len(tok.encode(t)) for t in val)
        assert 3.0 < n_bytes / n_tok < 4.5


def test_byte_tokenizer_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.encode("A\u00e9") == [0x41 + 3, 0xC3 + 3, 0xA9 + 3]
    assert tok.decode([1, 0x41 + 3, 2]) == "<|bos|>A<|eos|>"
    assert tok.decode([1, 0x41 + 3, 2], skip_special_tokens=True) == "A"


def test_tokenizer_retrains_reproducibly():
    """make_corpus.py --tokenizer retrains tokenizer.json from the train split: same fingerprint."""
    retrained = train_bpe(d["text"] for d in read_corpus("train"))
    assert retrained.fingerprint == default_tokenizer().fingerprint


# --------------------------------------------------------------------------------------------------------- packing

def _check_packing(docs, row_len):
    tokens, seg = pack_documents(docs, row_len, pad_id=0)
    assert tokens.shape == seg.shape and tokens.shape[1] == row_len and tokens.dtype == np.int32
    # every non-pad token exactly once, in order
    np.testing.assert_array_equal(tokens[seg > 0], np.concatenate(docs))
    assert (tokens[seg == 0] == 0).all()
    doc_of = {int(t): k for k, d in enumerate(docs) for t in d}      # token values are unique across docs
    rows_of_doc: dict[int, set] = {}
    for r in range(len(tokens)):
        s = seg[r]
        k = int((s > 0).sum())
        assert (s[:k] > 0).all() and (s[k:] == 0).all()                # padding only at the end
        ids = s[:k]
        assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()   # 1, 2, 3 ...
        for sid in np.unique(ids):
            owners = {doc_of[int(t)] for t in tokens[r][s == sid]}
            assert len(owners) == 1                                     # a segment never mixes documents
            rows_of_doc.setdefault(owners.pop(), set()).add(r)
        assert r == len(tokens) - 1 or k > 0
    for k, d in enumerate(docs):
        if len(d) <= row_len:
            assert len(rows_of_doc[k]) == 1                             # short documents are never split
    return tokens, seg


@pytest.mark.parametrize("row_len", [1, 2, 7, 16, 257])
def test_pack_documents_properties(row_len):
    rng = np.random.default_rng(row_len)
    lengths = list(rng.integers(1, 3 * row_len + 2, size=60)) + [row_len, row_len + 1, 1, 2 * row_len]
    rng.shuffle(lengths)
    start, docs = 1, []
    for n in lengths:
        docs.append(np.arange(start, start + n, dtype=np.int32))
        start += n
    tokens, seg = _check_packing(docs, row_len)
    again = pack_documents(docs, row_len)
    np.testing.assert_array_equal(again[0], tokens)
    np.testing.assert_array_equal(again[1], seg)


def test_pack_documents_layout():
    tokens, seg = pack_documents([[5, 6, 2], [7, 2], [8, 9, 10, 11, 12, 13, 14, 2], [15, 2]], row_len=4)
    np.testing.assert_array_equal(tokens, [[5, 6, 2, 0], [7, 2, 8, 9], [10, 11, 12, 13], [14, 2, 15, 2]])
    np.testing.assert_array_equal(seg, [[1, 1, 1, 0], [1, 1, 2, 2], [1, 1, 1, 1], [1, 1, 2, 2]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 0, 1]])


def _brute_masks(seg):
    b, length = seg.shape
    nxt = np.zeros((b, length - 1), bool)
    mtp = np.zeros((b, length - 1), bool)
    for i in range(b):
        for t in range(length - 1):
            nxt[i, t] = seg[i, t] != 0 and seg[i, t + 1] == seg[i, t]
            if t + 2 < length:
                mtp[i, t] = seg[i, t] != 0 and seg[i, t + 1] == seg[i, t] and seg[i, t + 2] == seg[i, t]
    return nxt, mtp


def test_loss_masks_match_brute_force(data_dir):
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, size=n) for n in rng.integers(1, 40, size=50)]
    _, packed = pack_documents(docs, 17)
    arbitrary = rng.integers(0, 3, size=(8, 17))                      # not a packing output: [1, 2, 1] etc.
    _, real = packed_split("validation", SEQ, data_dir)
    for seg in (packed, arbitrary, real[:32]):
        nxt, mtp = loss_masks(seg)
        want_nxt, want_mtp = _brute_masks(seg)
        np.testing.assert_array_equal(nxt, want_nxt)
        np.testing.assert_array_equal(mtp, want_mtp)
    import jax.numpy as jnp
    nxt_j, mtp_j = loss_masks(jnp.asarray(packed))
    np.testing.assert_array_equal(np.asarray(nxt_j), _brute_masks(packed)[0])
    np.testing.assert_array_equal(np.asarray(mtp_j), _brute_masks(packed)[1])


def test_packed_split_holds_every_token(data_dir):
    tok = default_tokenizer()
    names, ids, offsets = tokenized_split("validation", data_dir)
    assert names == sorted(d["name"] for d in read_corpus("validation"))
    docs = [np.append(ids[a:b], tok.eos_id) for a, b in itertools.pairwise(offsets)]
    tokens, seg = packed_split("validation", SEQ, data_dir)
    assert tokens.shape[1] == SEQ + 1
    np.testing.assert_array_equal(tokens[seg > 0], np.concatenate(docs))
    assert (seg > 0).mean() > 0.99                                      # code files are long: little padding
    assert tok.decode(docs[0][:-1]) == read_corpus("validation")[0]["text"]


# -------------------------------------------------------------------------------------------------------- iterator

def _row_set(rows):
    return sorted(r.tobytes() for r in rows)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x["tokens"], y["tokens"]) and np.array_equal(x["segment_ids"], y["segment_ids"])
               for x, y in zip(a, b, strict=True))


def test_iterator_deterministic_and_epochs(data_dir):
    b = 32
    tokens, _ = packed_split("validation", SEQ, data_dir)
    n = len(tokens)                                                      # 728 rows: ~22.75 batches per epoch
    a = _take(make_dataset("validation", SEQ, b, seed=3, data_dir=data_dir), 2 * n // b + 2)
    assert a[0]["tokens"].shape == (b, SEQ + 1) and a[0]["tokens"].dtype == np.int32
    assert a[0]["segment_ids"].dtype == np.int32
    assert _same(a, _take(make_dataset("validation", SEQ, b, seed=3, data_dir=data_dir), len(a)))
    rows = np.concatenate([x["tokens"] for x in a])
    epoch0, epoch1 = rows[:n], rows[n:2 * n]
    assert _row_set(epoch0) == _row_set(tokens) == _row_set(epoch1)   # each row once
    assert not np.array_equal(epoch0, epoch1)                            # reshuffled per epoch
    assert not np.array_equal(epoch0, tokens)                            # actually shuffled
    other = _take(make_dataset("validation", SEQ, b, seed=4, data_dir=data_dir), 3)
    assert not _same(a[:3], other)


@pytest.mark.parametrize("stop", [5, 22, 23, 30])     # before, at and after the first epoch boundary (~22.75)
def test_iterator_exact_resume(data_dir, stop):
    kw = {"split": "validation", "seq_len": SEQ, "batch_size": 32, "seed": 11, "data_dir": data_dir}
    it = make_dataset(**kw)
    ref = _take(it, 50)
    it = make_dataset(**kw)
    _take(it, stop)
    state = json.loads(json.dumps(it.get_state()))                       # a JSON round trip, as in a checkpoint
    assert len(json.dumps(state)) < 1000
    resumed = make_dataset(**kw)
    resumed.set_state(state)
    assert _same(_take(resumed, 50 - stop), ref[stop:])
    assert _same(_take(it, 50 - stop), ref[stop:])                       # get_state did not disturb the original
    with pytest.raises(ValueError, match="other settings"):
        make_dataset(**{**kw, "seed": 12}).set_state(state)


def test_eval_iterator_whole_split_once(data_dir):
    tokens, seg = packed_split("validation", SEQ, data_dir)
    b = 100
    it = make_eval_dataset("validation", SEQ, b, data_dir=data_dir)
    batches = list(it)
    assert len(batches) == it.num_batches == -(-len(tokens) // b)
    assert all(x["tokens"].shape == (b, SEQ + 1) for x in batches)     # static shapes: last batch padded
    rows = np.concatenate([x["tokens"] for x in batches])
    segs = np.concatenate([x["segment_ids"] for x in batches])
    np.testing.assert_array_equal(rows[:len(tokens)], tokens)          # fixed order
    np.testing.assert_array_equal(segs[:len(tokens)], seg)
    assert (segs[len(tokens):] == 0).all() and (rows[len(tokens):] == 0).all()
    assert _same(batches, list(make_eval_dataset("validation", SEQ, b, data_dir=data_dir)))


def test_shards_partition_rows(data_dir):
    tokens, _ = packed_split("validation", SEQ, data_dir)
    got = []
    for i in range(2):
        it = make_dataset("validation", SEQ, 16, seed=0, data_dir=data_dir, num_epochs=1, shard_index=i,
                          num_shards=2, drop_remainder=False)
        got += [r for x in it for r, s in zip(x["tokens"], x["segment_ids"]) if s.any()]
    assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in tokens)


def test_prepare_reports_sizes_byte_tokenizer(data_dir):
    info = prepare(data_dir, tokenizer="byte", seq_len=64)
    corpus = read_corpus()
    for split in ("train", "validation"):
        s = info["splits"][split]
        docs = [d for d in corpus if split_of(d["name"]) == split]
        assert s["docs"] == len(docs)
        assert s["bytes"] == s["tokens"] == sum(len(d["text"].encode()) for d in docs)   # byte tokens == bytes
        assert s["rows"] * 65 * s["fill"] == pytest.approx(s["tokens"] + s["docs"])      # + one eos per doc
    batch = next(make_dataset("train", 64, 4, seed=0, data_dir=data_dir, tokenizer="byte"))
    assert batch["tokens"].shape == (4, 65) and batch["tokens"].max() < 259


def test_prepared_data_rebuilt_when_corpus_changes(data_dir, tmp_path, monkeypatch):
    import shutil

    import v4jax.data.builder as builder_mod
    d = tmp_path / "copy"
    shutil.copytree(data_dir, d)
    real = builder_mod.corpus_sha256()
    monkeypatch.setattr(builder_mod, "corpus_sha256", lambda: "0" * 64)     # as if the shipped corpus changed
    assert ensure_prepared(d).info.metadata["corpus_sha256"] == "0" * 64
    monkeypatch.setattr(builder_mod, "corpus_sha256", lambda: real)
    b = ensure_prepared(d)
    assert b.info.metadata["corpus_sha256"] == real and len(b.as_data_source("validation")) > 0
