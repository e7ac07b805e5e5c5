"""Training on your own data: every input format, the hash split, tokenizer files and training, streamed
array_record shards (against the in-memory packer), exact resume, each bad input's error, and the CLI."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from v4jax.config import ConfigError
from v4jax.data.packing import pack_documents
from v4jax.data.pipeline import make_dataset, make_eval_dataset
from v4jax.data.shards import UserData, prepare_user_data
from v4jax.data.sources import DataError, FileSource, TfdsSource, in_eval_split
from v4jax.data.tokenizer import ByteTokenizer, get_tokenizer, train_bpe

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def _texts(n, seed=0, lo=20, hi=400):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) + f" [{i}] é" for i in range(n)]


@pytest.fixture()
def corpus(tmp_path):
    """A folder of every format: 3 .txt (one in a subfolder), 1 .md, a .jsonl (+ a blank line and an empty
    text), a .json array, a .jsonl.gz and a .parquet; returns (dir, {name: text}) in the source's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = _texts(16)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / ".hidden" / "skip.txt").write_text("never read")
    (d / "notes.csv").write_text("ignored,suffix\n")
    (d / "a.txt").write_text(t[0])
    (d / "sub" / "b.txt").write_text(t[1])
    (d / "c.md").write_text(t[2])
    (d / "d.jsonl").write_text(json.dumps({"text": t[3], "id": 1}) + "\n\n" + json.dumps({"text": ""}) + "\n"
                               + json.dumps({"text": t[4]}) + "\n")
    (d / "e.json").write_text(json.dumps([{"text": t[5]}, {"text": t[6], "meta": 2}]))
    with gzip.open(d / "f.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": t[7]}) + "\n")
    pq.write_table(pa.table({"text": t[8:12] + [None], "n": list(range(5))}), d / "g.parquet")
    (d / "z.txt").write_text(t[12])
    want = {"a.txt": t[0], "c.md": t[2], "d.jsonl:1": t[3], "d.jsonl:4": t[4], "e.json:0": t[5], "e.json:1": t[6],
            "f.jsonl.gz:1": t[7], **{f"g.parquet:{i}": t[8 + i] for i in range(4)}, "sub/b.txt": t[1],
            "z.txt": t[12]}
    return d, want


# ------------------------------------------------------------------------------------------------------- formats

def test_every_format_read_exactly_in_path_order(corpus):
    d, want = corpus
    got = list(FileSource(str(d)).documents())
    assert [n for n, _ in got] == list(want)                  # sorted paths, records in file order
    assert dict(got) == want                                  # byte for byte; empty texts and None skipped


def test_glob_single_file_and_text_field(corpus, tmp_path):
    d, want = corpus
    assert dict(FileSource(str(d / "**" / "*.txt")).documents()) == {"a.txt": want["a.txt"],
                                                                    "sub/b.txt": want["sub/b.txt"],
                                                                    "z.txt": want["z.txt"]}
    assert dict(FileSource(str(d / "e.json")).documents()) == {"e.json:0": want["e.json:0"],
                                                              "e.json:1": want["e.json:1"]}
    p = tmp_path / "other.jsonl"
    p.write_text(json.dumps({"body": "first"}) + "\n" + json.dumps({"body": "second"}) + "\n")
    assert [t for _, t in FileSource(str(p), text_field="body").documents()] == ["first", "second"]
    # a .json file of JSON lines is read as lines
    q = tmp_path / "lines.json"
    q.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert [t for _, t in FileSource(str(q)).documents()] == ["x", "y"]


def test_fingerprint_follows_the_files(corpus):
    d, _ = corpus
    a = FileSource(str(d)).fingerprint()
    assert FileSource(str(d)).fingerprint() == a
    assert FileSource(str(d), text_field="body").fingerprint() != a
    (d / "new.txt").write_text("one more document")
    assert FileSource(str(d)).fingerprint() != a


# ------------------------------------------------------------------------------------------------------ bad input

def _err(fn, *match):
    with pytest.raises(DataError) as e:
        fn()
    for m in match:
        assert m in str(e.value), str(e.value)
    return str(e.value)


def test_bad_paths_and_files_name_the_file(tmp_path):
    docs = lambda p, **kw: list(FileSource(str(p), **kw).documents())     # noqa: E731
    _err(lambda: docs(tmp_path / "missing"), "missing", "no such file or directory")
    _err(lambda: docs(tmp_path / "*.txt"), "*.txt", "matches no file")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "data.csv").write_text("a,b\n")
    _err(lambda: docs(tmp_path / "empty_dir"), "empty_dir", "holds no")
    _err(lambda: docs(tmp_path / "empty_dir" / "data.csv"), "data.csv", "unsupported suffix")
    (tmp_path / "e.txt").write_text("  \n")
    _err(lambda: docs(tmp_path / "e.txt"), "e.txt", "empty")
    (tmp_path / "e.jsonl").write_text("\n\n")
    _err(lambda: docs(tmp_path / "e.jsonl"), "e.jsonl", "empty")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _err(lambda: docs(tmp_path / "latin1.txt"), "latin1.txt", "not UTF-8", "byte 3")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    _err(lambda: docs(tmp_path / "nofield.jsonl"), "nofield.jsonl", "line 2", "no 'text' field", "body",
         "--text-field")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    _err(lambda: docs(tmp_path / "broken.jsonl"), "broken.jsonl", "line 2", "invalid JSON")
    (tmp_path / "list.jsonl").write_text('["not", "an", "object"]\n')
    _err(lambda: docs(tmp_path / "list.jsonl"), "list.jsonl", "line 1", "JSON object")
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    _err(lambda: docs(tmp_path / "num.jsonl"), "num.jsonl", "line 1", "not a string")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    _err(lambda: docs(tmp_path / "bad.parquet"), "bad.parquet", "not a readable Parquet file")

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "col.parquet")
    _err(lambda: docs(tmp_path / "col.parquet"), "col.parquet", "no column 'text'", "body")
    if os.geteuid() != 0:                                   # root reads anything
        p = tmp_path / "locked.txt"
        p.write_text("secret")
        p.chmod(0)
        _err(lambda: docs(p), "locked.txt", "cannot read")


# ------------------------------------------------------------------------------------------------- the hash split

def test_hash_split_deterministic_and_duplicate_safe():
    texts = _texts(2000, seed=1, lo=3, hi=8)
    held = [t for t in texts if in_eval_split(t, 0.1)]
    assert 0.07 < len(held) / len(texts) < 0.13                       # the fraction, within sampling noise
    assert held == [t for t in texts if in_eval_split(t, 0.1)]          # a pure function of the text
    assert set(held) <= {t for t in texts if in_eval_split(t, 0.2)}     # nested in the fraction
    assert not any(in_eval_split(t, 1e-9) for t in texts[:50])


def test_prepared_splits_match_the_hash_rule_and_the_in_memory_packer(corpus, tmp_path):
    d, want = corpus
    tok = ByteTokenizer()
    spec = UserData(FileSource(str(d)), eval_fraction=0.3)
    prep = prepare_user_data(spec, tok, row_len=33, cache_dir=tmp_path / "cache", progress=False, rows_per_shard=7)
    assert len(prep.splits["train"]["files"]) > 2                   # streamed into several shards
    for split in ("train", "validation"):
        texts = [t for t in want.values() if in_eval_split(t, 0.3) == (split == "validation")]
        ids = [tok.encode(t) + [tok.eos_id] for t in texts]
        ref_tok, ref_seg = pack_documents(ids, 33, pad_id=tok.pad_id)      # the in-memory packer
        rows = prep.rows(split)
        got_tok, got_seg = rows.take(np.arange(len(rows)))
        np.testing.assert_array_equal(got_tok, ref_tok)
        np.testing.assert_array_equal(got_seg, ref_seg)
        st = prep.splits[split]
        assert st["docs"] == len(texts) and st["tokens"] == sum(len(i) - 1 for i in ids)
        assert st["bytes"] == sum(len(t.encode()) for t in texts) and st["rows"] == len(ref_tok)
    # reused, not rebuilt: the same directory
    again = prepare_user_data(spec, tok, row_len=33, cache_dir=tmp_path / "cache", progress=False)
    assert again.directory == prep.directory
    assert not [p for p in (tmp_path / "cache" / "v4jax_shards").iterdir() if p.name.startswith(".")]


def test_small_corpus_still_holds_one_document_out(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    texts = _texts(3, seed=5)
    for i, t in enumerate(texts):
        (d / f"{i}.txt").write_text(t)
    assert not any(in_eval_split(t, 0.01) for t in texts)
    prep = prepare_user_data(UserData(FileSource(str(d)), eval_fraction=0.01), ByteTokenizer(), 65,
                             tmp_path / "cache", progress=False)
    assert prep.splits["validation"]["docs"] == 1 and prep.splits["train"]["docs"] == 2
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("only one document")
    _err(lambda: prepare_user_data(UserData(FileSource(str(tmp_path / "one"))), ByteTokenizer(), 65,
                                   tmp_path / "cache", progress=False), "1 document", "--eval-data")


def test_eval_data_and_exact_resume(corpus, tmp_path):
    d, want = corpus
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(3, seed=9)))
    spec = UserData(FileSource(str(d)), FileSource(str(held)))
    kw = dict(seq_len=48, batch_size=3, seed=4, data_dir=tmp_path / "cache", tokenizer="byte", source=spec)
    it = make_dataset("train", **kw)
    assert it.stats["docs"] == len(want)                       # every training document, none held out
    ev = make_eval_dataset("validation", **{k: v for k, v in kw.items() if k != "seed"})
    assert ev.stats["docs"] == 3
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expect = [next(it) for _ in range(40)]                     # across an epoch boundary
    resumed = make_dataset("train", **kw)
    resumed.set_state(state)
    for a in expect:
        b = next(resumed)
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
    # the state names its data: another corpus refuses it
    (d / "extra.txt").write_text("changes the fingerprint")
    other = make_dataset("train", **kw)
    with pytest.raises(ValueError, match="other settings"):
        other.set_state(state)


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
    from v4jax.data import ensure_prepared, read_split

    ensure_prepared(tmp_path)
    src = TfdsSource("v4jax_text:1.0.0", split="validation", data_dir=str(tmp_path))
    got = sorted(t for _, t in src.documents())
    assert got == sorted(doc["text"] for doc in read_split("validation", tmp_path))
    assert "validation" in src.splits()
    _err(lambda: list(TfdsSource("v4jax_text", split="nope", data_dir=str(tmp_path)).documents()), "no split 'nope'")
    _err(lambda: list(TfdsSource("v4jax_text", split="train", data_dir=str(tmp_path),
                                 text_field="body").documents()), "no feature 'body'")
    _err(lambda: TfdsSource("no_such_dataset_xyz", data_dir=str(tmp_path)).builder(), "no_such_dataset_xyz")


# ------------------------------------------------------------------------------------------------------ tokenizers

def _gpt2_like(tmp_path):
    """A tokenizer.json of another family: byte-level BPE whose only special is <|endoftext|> (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_texts(50), trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    path = tmp_path / "gpt2ish" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path, tok


def test_any_tokenizer_json_path(tmp_path):
    path, ref = _gpt2_like(tmp_path)
    tok = get_tokenizer(str(path))
    assert tok.eos_id == tok.bos_id == tok.pad_id == ref.token_to_id("<|endoftext|>") == 0
    assert tok.vocab_size == 300
    text = "alpha beta <|endoftext|> gamma"                     # the special's text stays text
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.decode(ids) == text
    assert get_tokenizer(str(path)) is tok                      # loaded once per file version
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "junk.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="junk.json"):
        get_tokenizer(str(tmp_path / "junk.json"))


def test_tokenizer_vocab_checked_against_the_model(tmp_path):
    from v4jax.train.config import train_preset
    from v4jax.train.loop import run_tokenizer

    path, _ = _gpt2_like(tmp_path)
    ok = train_preset("tiny", ["model.vocab_size=300", f"tokenizer={path}"])
    assert run_tokenizer(ok).vocab_size == 300
    small = train_preset("tiny", ["model.vocab_size=299", f"tokenizer={path}"])
    with pytest.raises(ConfigError, match=r"300 ids but model.vocab_size is 299"):
        run_tokenizer(small)
    with pytest.raises(ConfigError, match="missing.json"):
        run_tokenizer(train_preset("tiny", [f"tokenizer={tmp_path / 'missing.json'}"]))


def test_v4jax_tokenizer_trains_on_user_data(corpus, tmp_path, capsys):
    from v4jax.train.cli import tokenizer_main

    d, want = corpus
    out = tmp_path / "tok" / "tokenizer.json"
    assert tokenizer_main(["--data", str(d), "--vocab-size", "300", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["docs"] == len(want) and rep["vocab_size"] == 300
    assert rep["bytes"] == sum(len(t.encode()) for t in want.values())
    tok = get_tokenizer(str(out))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 300
    for t in want.values():
        assert tok.decode(tok.encode(t)) == t
    # the same text gives the same tokenizer (train_bpe is deterministic)
    assert train_bpe(want.values(), 300).fingerprint == tok.fingerprint
    # too large a vocabulary for the text, and bad sources: one clear error, nothing written
    bad = tmp_path / "bad.json"
    assert tokenizer_main(["--data", str(d / "a.txt"), "--vocab-size", "60000", "--out", str(bad)]) == 2
    assert "fewer than vocab_size 60000" in capsys.readouterr().err and not bad.exists()
    assert tokenizer_main(["--data", str(tmp_path / "nothing"), "--out", str(bad)]) == 2
    assert "no such file or directory" in capsys.readouterr().err and not bad.exists()


# --------------------------------------------------------------------------------------------------- the command

def _run_flags(steps):
    sets = ["model.dim=32", "model.n_layers=2", 'model.layer_types=["csa","hca"]', "model.n_hash_layers=1",
            "model.n_mtp_layers=0", "model.hca_ratio=8", "model.n_heads=2", "model.head_dim=16",
            "model.rope_head_dim=8", "model.q_lora_rank=16", "model.o_lora_rank=8", "model.window_size=8",
            "model.index_n_heads=2", "model.index_head_dim=16", "model.index_topk=3", "model.n_routed_experts=4",
            "model.moe_inter_dim=16", "model.vocab_size=300", "runtime.attention=reference", "seq_len=32",
            "batch_size=4", f"total_steps={steps}", f"optim.total_steps={steps}", f"optim.decay_start={steps}",
            "optim.warmup_steps=0", "optim.peak_lr=1e-2", "dense_attention_steps=0", "indexer_warmup_steps=0",
            "log_every=1", f"eval_every={steps}", "eval_batches=2", f"checkpoint_every={steps}",
            "async_checkpointing=false"]
    return [f"--set={s}" for s in sets]


def test_train_cli_on_a_folder_of_text_files(tmp_path, capsys):
    """``v4jax-train --data DIR --tokenizer FILE`` on ordinary .txt files: the loss falls, the data is
    reported, the tokenizer lands in the workdir, and a resume with other data is refused."""
    from v4jax.train.cli import tokenizer_main, train_main

    d = tmp_path / "mine"
    d.mkdir()
    for i, t in enumerate(_texts(40, seed=3)):
        (d / f"doc{i:02d}.txt").write_text(t)
    tok = tmp_path / "tok.json"
    assert tokenizer_main(["--data", str(d), "--vocab-size", "300", "--out", str(tok), "--no-progress"]) == 0
    work = tmp_path / "run"
    steps = 16
    rc = train_main(["--workdir", str(work), "--data", str(d), "--tokenizer", str(tok), "--data-dir",
                     str(tmp_path / "cache"), "--no-progress", *_run_flags(steps)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "train data: " in out and "bytes/token" in out and "validation data: " in out
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in rows if not r.get("eval")]
    assert len(losses) == steps
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5          # it learns the 24-word language
    assert (work / "tokenizer.json").read_text() == tok.read_text()
    saved = json.loads((work / "train_config.json").read_text())
    assert saved["data"] == str(d) and saved["tokenizer"] == str(tok)
    # resuming with other data is refused, nothing changed on disk
    before = sorted(os.listdir(work))
    assert train_main(["--workdir", str(work), "--data", str(tmp_path), "--no-progress"]) == 2
    assert "cannot change" in capsys.readouterr().err and sorted(os.listdir(work)) == before
