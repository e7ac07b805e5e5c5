"""Deterministic, resumable batches of packed tokens for training and evaluation.

    >>> from v4jax.data import make_dataset, make_eval_dataset, loss_masks
    >>> it = make_dataset("train", seq_len=256, batch_size=16, seed=0)
    >>> batch = next(it)                      # {"tokens": int32 [16, 257], "segment_ids": int32 [16, 257]}
    >>> state = it.get_state()                # small JSON-able dict; save it with the checkpoint
    >>> it2 = make_dataset("train", seq_len=256, batch_size=16, seed=0); it2.set_state(state)   # same batches follow

Documents are read from the prepared TFDS dataset (``builder.py``), sorted by name, tokenized, eos-terminated and
packed once (``packing.pack_documents``); token ids and packed rows are cached as ``.npz`` under
``data_dir/v4jax_text_cache/`` keyed by corpus hash, tokenizer fingerprint and row length, so later runs start in well
under a second. Rows are then served by ``grain``: ``MapDataset.range(rows)`` → shard slice → ``shuffle`` (a new
permutation each epoch, derived from the seed) → ``repeat`` → ``batch`` → gather. The iterator position is grain's
``next_index`` plus the settings it was made with.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from v4jax.data.builder import default_data_dir, ensure_prepared, read_split
from v4jax.data.corpus import SPLITS, corpus_sha256
from v4jax.data.packing import pack_documents
from v4jax.data.shards import UserData, prepare_user_data
from v4jax.data.sources import FileSource
from v4jax.data.tokenizer import get_tokenizer

PACK_VERSION = 1                 # bump when pack_documents changes its output
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------------- caches

def _cache_dir(data_dir) -> Path:
    return (Path(data_dir) if data_dir is not None else default_data_dir()) / "v4jax_text_cache"


def _save_npz(path: Path, **arrays) -> None:
    """Write atomically (tmp file + rename), so concurrent processes never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def tokenized_split(split: str, data_dir=None, tokenizer=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(names, ids, offsets)`` for a split: document ``k`` (sorted by name) is ``ids[offsets[k]:offsets[k+1]]``,
    without eos. Cached per (corpus, tokenizer) together with each document's UTF-8 size (``split_num_bytes``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    tok = get_tokenizer(tokenizer)
    path = _tokens_path(split, data_dir, tok)
    if path.exists():
        with np.load(path) as z:
            return z["names"].tolist(), z["ids"], z["offsets"]
    docs = read_split(split, data_dir)
    encoded = tok.encode_batch([d["text"] for d in docs])
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    ids = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(offsets[-1]))
    names = [d["name"] for d in docs]
    nbytes = np.array([len(d["text"].encode("utf-8")) for d in docs], dtype=np.int64)
    _save_npz(path, names=np.array(names), ids=ids, offsets=offsets, nbytes=nbytes)
    return names, ids, offsets


def _tokens_path(split, data_dir, tok) -> Path:
    return _cache_dir(data_dir) / f"tokens-{split}-{corpus_sha256()[:12]}-{tok.fingerprint}.npz"


def split_num_bytes(split: str, data_dir=None, tokenizer=None) -> int:
    """UTF-8 bytes of a split's documents (from the token cache, filled if needed)."""
    tok = get_tokenizer(tokenizer)
    tokenized_split(split, data_dir, tok)
    with np.load(_tokens_path(split, data_dir, tok)) as z:
        return int(z["nbytes"].sum())


def packed_split(split: str, seq_len: int, data_dir=None, tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """Packed ``(tokens, segment_ids)``, int32 ``[n_rows, seq_len + 1]``, documents in name order. Cached."""
    tok = get_tokenizer(tokenizer)
    row_len = int(seq_len) + 1
    path = _cache_dir(data_dir) / (f"packed-{split}-{corpus_sha256()[:12]}-{tok.fingerprint}-L{row_len}"
                                   f"-p{PACK_VERSION}.npz")
    if path.exists():
        with np.load(path) as z:
            return z["tokens"], z["segment_ids"]
    _, ids, offsets = tokenized_split(split, data_dir, tok)
    eos = np.array([tok.eos_id], dtype=np.int32)
    docs = (np.concatenate([ids[a:b], eos]) for a, b in itertools.pairwise(offsets))
    tokens, seg = pack_documents(docs, row_len, pad_id=tok.pad_id)
    _save_npz(path, tokens=tokens, segment_ids=seg)
    return tokens, seg


# ----------------------------------------------------------------------------------------------------- iterator

def _grain_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed+e, so seeds s and s+1 would give the same orders one epoch apart; hashing
    # the user's seed makes such overlaps as unlikely as a 32-bit collision.
    return int.from_bytes(hashlib.sha256(f"v4jax-data-seed:{int(seed)}".encode()).digest()[:4], "big")


class ArrayRows:
    """Packed rows held in memory (the shipped corpus): ``take(idx)`` → ``(tokens, segment_ids)``."""

    def __init__(self, tokens: np.ndarray, seg: np.ndarray):
        self.tokens, self.seg = tokens, seg
        self.row_len = tokens.shape[1]

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, idx):
        return self.tokens[idx], self.seg[idx]


class _Gather:
    """Row indices → batch dict; indices past a finite dataset's end (short last batch) become padding rows."""

    def __init__(self, store, batch_size, pad_id, rows=None):
        self.store, self.batch_size, self.pad_id = store, batch_size, pad_id
        self.rows = rows

    def __call__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        want = self.batch_size
        if self.rows is not None:            # this process's rows [lo, hi) of the global batch
            lo, hi = self.rows
            idx, want = idx[lo:hi], hi - lo
        tokens, seg = self.store.take(idx)
        short = want - len(idx)
        if short:
            L = self.store.row_len
            tokens = np.concatenate([tokens, np.full((short, L), self.pad_id, np.int32)])
            seg = np.concatenate([seg, np.zeros((short, L), np.int32)])
        return {"tokens": tokens, "segment_ids": seg}


class DataIterator:
    """Iterator of numpy batches ``{"tokens", "segment_ids"}`` (int32 ``[B, seq_len + 1]``) with an exact,
    JSON-able position: ``get_state()`` / ``set_state(state)``. ``store`` is the packed rows, in memory
    (``ArrayRows``) or in array_record shards (``shards.ShardRows``)."""

    def __init__(self, store, *, settings: dict, pad_id: int, rows=None, stats: dict | None = None):
        import grain

        self.settings = settings
        self.stats = stats or {}
        n = len(store)
        self.num_rows = len(range(settings["shard_index"], n, settings["num_shards"]))
        b, epochs = settings["batch_size"], settings["num_epochs"]
        ds = grain.MapDataset.range(n)
        if settings["num_shards"] > 1:
            ds = ds[settings["shard_index"]::settings["num_shards"]]
        if settings["shuffle"]:
            ds = ds.shuffle(seed=_grain_seed(settings["seed"]))
        if b == 1:
            # the same rows in the same order, batched before the repeat: grain sizes an endless
            # batch(1) as ceil(sys.maxsize / 1.0) = 2**63, which overflows len() (OverflowError)
            ds = ds.batch(1).repeat(epochs)
        else:
            ds = ds.repeat(epochs)
            ds = ds.batch(b, drop_remainder=settings["drop_remainder"])
        ds = ds.map(_Gather(store, b, pad_id, rows))
        self.num_batches = None if epochs is None else len(ds)        # None: endless
        self.batches_per_epoch = self.num_rows / b
        self._it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self._it.__next__()

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, **self.settings, "grain": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        state = json.loads(json.dumps(state))            # accept states that went through JSON (or orbax JsonSave)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data-iterator state version {state.get('version')!r}")
        diff = {k: (state.get(k), v) for k, v in self.settings.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"state was saved by an iterator with other settings (saved, this): {diff}")
        self._it.set_state(state["grain"])

    def __repr__(self) -> str:
        return f"DataIterator({self.settings}, rows={self.num_rows}, batches={self.num_batches})"


def make_dataset(split: str = "train", seq_len: int = 256, batch_size: int = 8, seed: int = 0, data_dir=None,
                 tokenizer=None, shuffle: bool = True, num_epochs: int | None = None, *, shard_index: int = 0,
                 num_shards: int = 1, drop_remainder: bool = False, rows: tuple[int, int] | None = None,
                 source=None, progress: bool = False) -> DataIterator:
    """Batches ``{"tokens": int32 [B, seq_len+1], "segment_ids": int32 [B, seq_len+1]}`` of packed rows.

    * ``shuffle``: rows are permuted per epoch (a different permutation each epoch, fixed by ``seed``); batches may
      straddle an epoch boundary. ``shuffle=False``: rows in document-name order.
    * ``num_epochs=None`` repeats forever. With a finite count the last short batch is padded with empty rows
      (segment 0, masked by ``loss_masks``) unless ``drop_remainder``; shapes stay static.
    * ``shard_index``/``num_shards``: this process gets rows ``shard_index::num_shards`` (e.g. per host).
    * ``rows=(lo, hi)``: yield only rows ``[lo, hi)`` of each global batch (what one process of a
      multi-host mesh feeds, ``v4jax.parallel.mesh.process_rows``); the order and the saved position
      are those of the global iterator, so any number of processes sees the same global batches.
    * ``tokenizer``: ``None``/"bpe" (shipped 4096 BPE), "byte", a tokenizer.json path, or a tokenizer object.
    * ``source``: ``None`` for the shipped corpus, or your own documents (``shards.UserData``, or a path /
      glob / directory string for ``FileSource`` with a 5 % hash split), tokenized and packed once into
      array_record shards under ``data_dir`` (``progress``: a bar while that runs); ``it.stats`` holds the
      split's documents, tokens and bytes per token.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if rows is not None and not (0 <= rows[0] < rows[1] <= batch_size):
        raise ValueError(f"rows {rows} is not a range within the batch of {batch_size}")
    tok = get_tokenizer(tokenizer)
    if source is None:
        store, stats = ArrayRows(*packed_split(split, seq_len, data_dir, tok)), {}
        data_key = f"{corpus_sha256()[:12]}-{tok.fingerprint}-p{PACK_VERSION}"
    else:
        prep = prepare_source(source, tok, seq_len, data_dir, progress)
        store, stats = prep.rows(split), prep.summary()[split]
        data_key = f"user-{prep.key}"
    settings = {"split": split, "seq_len": int(seq_len), "batch_size": int(batch_size), "seed": int(seed),
                "shuffle": bool(shuffle), "num_epochs": num_epochs, "shard_index": int(shard_index),
                "num_shards": int(num_shards), "drop_remainder": bool(drop_remainder), "data": data_key}
    return DataIterator(store, settings=settings, pad_id=tok.pad_id, rows=None if rows is None else tuple(rows),
                        stats=stats)


def prepare_source(source, tokenizer, seq_len: int, data_dir=None, progress: bool = False):
    """``shards.prepare_user_data`` for a ``UserData`` (or a path string) under ``data_dir``'s cache."""
    if isinstance(source, (str, os.PathLike)):
        source = UserData(FileSource(str(source)))
    if not isinstance(source, UserData):
        raise TypeError(f"source must be a UserData or a path, got {type(source).__name__}")
    cache = Path(data_dir) if data_dir is not None else default_data_dir()
    return prepare_user_data(source, get_tokenizer(tokenizer), int(seq_len) + 1, cache, progress=progress)


def make_eval_dataset(split: str = "validation", seq_len: int = 256, batch_size: int = 8, data_dir=None,
                      tokenizer=None, **kw) -> DataIterator:
    """The whole split once, in fixed (document-name) order; the last batch is padded with empty rows."""
    return make_dataset(split, seq_len, batch_size, seed=0, data_dir=data_dir, tokenizer=tokenizer, shuffle=False,
                        num_epochs=1, **kw)


def prepare(data_dir=None, tokenizer=None, seq_len: int | None = None) -> dict:
    """Build the TFDS dataset if needed, tokenize (and, with ``seq_len``, pack) both splits into the cache, and report
    documents, UTF-8 bytes and tokens (without eos) per split."""
    builder = ensure_prepared(data_dir)
    tok = get_tokenizer(tokenizer)
    info = {"data_dir": str(builder.data_dir), "corpus_sha256": corpus_sha256(), "tokenizer": tok.fingerprint,
            "vocab_size": tok.vocab_size, "splits": {}}
    for split in SPLITS:
        names, _, offsets = tokenized_split(split, data_dir, tok)
        n_bytes, n_tokens = split_num_bytes(split, data_dir, tok), int(offsets[-1])
        s = {"docs": len(names), "bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(n_bytes / n_tokens, 3)}
        if seq_len is not None:
            tokens, seg = packed_split(split, seq_len, data_dir, tok)
            s.update(rows=len(tokens), fill=float((seg > 0).mean()))
        info["splits"][split] = s
    return info
