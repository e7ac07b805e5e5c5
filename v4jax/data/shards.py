"""Your own corpus, tokenized and packed once into array_record shards, then served like the shipped one.

    >>> from v4jax.data.sources import FileSource
    >>> from v4jax.data.shards import UserData, prepare_user_data
    >>> spec = UserData(FileSource("my_corpus/"), eval_fraction=0.05)
    >>> prep = prepare_user_data(spec, tokenizer, row_len=257)    # streams the files once (progress bar)
    >>> prep.splits["train"]                     # {"docs", "tokens", "bytes", "bytes_per_token", "rows", ...}
    >>> src = prep.rows("train")                 # random access: src[i] -> (tokens, segment_ids) int32 [row_len]

One pass over the documents: each goes to the held-out split (``eval`` source, else the hash split
``sources.in_eval_split``), is tokenized (in batches, eos appended), and packed by ``packing.RowPacker``;
finished rows are written as they come to ``{split}-NNNNN.array_record`` files (one record per row:
the int32 tokens then the int32 segment ids), so memory stays flat whatever the corpus size. The shard
directory is keyed by the source's fingerprint (paths, sizes, mtimes; or the TFDS name/version), the
tokenizer, the row length and the split rule; it is built under a temporary name and renamed into place
(atomic: concurrent processes or hosts never see half a directory, the second one reuses the first's).
``manifest.json`` records the counts (documents, tokens, UTF-8 bytes, rows, fill) per split.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from v4jax.data.packing import RowPacker
from v4jax.data.sources import DataError, FileSource, TfdsSource, in_eval_split

SHARD_VERSION = 1
ROWS_PER_SHARD = 16384          # ~16 MiB shards at 256-token rows
ENCODE_BATCH = 256              # documents per tokenizer call


@dataclass(frozen=True)
class UserData:
    """What to train and evaluate on: a training source, and either a held-out source or the hash-split
    fraction of the training documents that is held out instead."""

    train: FileSource | TfdsSource
    eval: FileSource | TfdsSource | None = None
    eval_fraction: float = 0.05

    def __post_init__(self):
        if self.eval is None and not 0.0 < self.eval_fraction < 1.0:
            raise DataError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")

    def key(self) -> dict:
        return {"train": self.train.fingerprint(), "eval": None if self.eval is None else self.eval.fingerprint(),
                "fraction": None if self.eval is not None else float(self.eval_fraction)}

    def describe(self) -> str:
        held = self.eval.describe() if self.eval is not None else f"{self.eval_fraction:g} of the documents (hash)"
        return f"{self.train.describe()}, held out: {held}"


class _ShardWriter:
    def __init__(self, directory: Path, split: str, rows_per_shard: int):
        self.dir, self.split, self.rows_per_shard = directory, split, rows_per_shard
        self.files: list[str] = []
        self._w = None
        self._n = 0               # rows in the current file
        self.rows = 0
        self.real = 0             # non-padding tokens

    def write(self, tokens: np.ndarray, seg: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._w is None or self._n == self.rows_per_shard:
            self.close()
            name = f"{self.split}-{len(self.files):05d}.array_record"
            # group_size:1: every record is its own chunk, the layout for random access (shuffled reads)
            self._w = ArrayRecordWriter(str(self.dir / name), "group_size:1")
            self.files.append(name)
            self._n = 0
        self._w.write(np.concatenate([tokens, seg]).astype("<i4").tobytes())
        self._n += 1
        self.rows += 1
        self.real += int((seg > 0).sum())

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class _Split:
    def __init__(self, directory, split, row_len, pad_id, rows_per_shard):
        self.writer = _ShardWriter(directory, split, rows_per_shard)
        self.packer = RowPacker(row_len, pad_id)
        self.docs = self.tokens = self.bytes = 0

    def add(self, ids: list[int], text: str, eos: int) -> None:
        self.docs += 1
        self.tokens += len(ids)
        self.bytes += len(text.encode("utf-8"))
        for t, s in self.packer.add(np.asarray(list(ids) + [eos], np.int32)):
            self.writer.write(t, s)

    def finish(self) -> dict:
        for t, s in self.packer.finish():
            self.writer.write(t, s)
        self.writer.close()
        w = self.writer
        return {"docs": self.docs, "tokens": self.tokens, "bytes": self.bytes,
                "bytes_per_token": round(self.bytes / self.tokens, 3) if self.tokens else None,
                "rows": w.rows, "fill": round(w.real / max(w.rows * self.packer.row_len, 1), 4), "files": w.files}


@dataclass
class Prepared:
    """A prepared shard directory: ``splits[split]`` counts, ``rows(split)`` the random-access rows."""

    directory: Path
    row_len: int
    splits: dict = field(default_factory=dict)
    key: str = ""

    def rows(self, split: str) -> "ShardRows":
        files = [str(self.directory / f) for f in self.splits[split]["files"]]
        return ShardRows(files, self.row_len, self.splits[split]["rows"])

    def summary(self) -> dict:
        return {s: {k: v for k, v in d.items() if k != "files"} for s, d in self.splits.items()}


class ShardRows:
    """Random access over the packed rows of one split: ``rows[idx]`` → ``(tokens, segment_ids)``, each int32
    ``[len(idx), row_len]`` (grain's ``ArrayRecordDataSource`` underneath; nothing is loaded up front)."""

    def __init__(self, files: list[str], row_len: int, n: int):
        import grain

        self.row_len, self.n = row_len, n
        self._src = grain.sources.ArrayRecordDataSource(files) if files else None
        if self._src is not None and len(self._src) != n:
            raise DataError(f"shard files {files[0]!r}... hold {len(self._src)} rows, the manifest says {n}: "
                            "delete the directory to rebuild it")

    def __len__(self) -> int:
        return self.n

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        idx = [int(i) for i in np.asarray(idx).reshape(-1)]
        recs = self._src.__getitems__(idx) if idx else []
        arr = np.frombuffer(b"".join(recs), dtype="<i4").reshape(len(idx), 2, self.row_len)
        return arr[:, 0].astype(np.int32), arr[:, 1].astype(np.int32)


def _doc_stream(source, progress: bool, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit=" docs", disable=not progress, mininterval=0.5, leave=False)
    try:
        for doc in source.documents():
            bar.update(1)
            yield doc
    finally:
        bar.close()


def _build(spec: UserData, tok, row_len: int, directory: Path, progress: bool, rows_per_shard: int,
           force_eval: frozenset[str] = frozenset()) -> dict:
    splits = {s: _Split(directory, s, row_len, tok.pad_id, rows_per_shard) for s in ("train", "validation")}
    # (source, its fixed split or None for the hash split)
    passes = [(spec.train, None)] if spec.eval is None else [(spec.train, "train"), (spec.eval, "validation")]
    first_name = None            # the hash-split fallback below: the train document with the smallest hash
    for source, fixed in passes:
        buf: list[tuple[str, str, str]] = []

        def flush():
            for (name, text, split), ids in zip(buf, tok.encode_batch([b[1] for b in buf])):
                splits[split].add(ids, text, tok.eos_id)
            buf.clear()

        for name, text in _doc_stream(source, progress, f"v4jax: tokenizing {source.describe()}"):
            if fixed is not None:
                split = fixed
            elif name in force_eval or (not force_eval and in_eval_split(text, spec.eval_fraction)):
                split = "validation"
            else:
                split = "train"
                if first_name is None or _h(text) < first_name[0]:
                    first_name = (_h(text), name)
            buf.append((name, text, split))
            if len(buf) >= ENCODE_BATCH:
                flush()
        flush()
    out = {s: sp.finish() for s, sp in splits.items()}
    out["_fallback"] = first_name[1] if first_name else None
    return out


def _h(text: str) -> bytes:
    import hashlib

    return hashlib.sha256(b"v4jax-eval:" + text.encode("utf-8")).digest()


def prepare_user_data(spec: UserData, tokenizer, row_len: int, cache_dir: str | os.PathLike,
                      progress: bool = True, rows_per_shard: int = ROWS_PER_SHARD) -> Prepared:
    """Tokenize and pack ``spec`` into array_record shards under ``cache_dir`` once (reused while the source,
    the tokenizer and ``row_len`` are unchanged); the counts are in ``Prepared.splits``."""
    import hashlib

    key_dict = {"v": SHARD_VERSION, "data": spec.key(), "tokenizer": tokenizer.fingerprint, "row_len": int(row_len),
                "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    key = hashlib.sha256(json.dumps(key_dict, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() / "v4jax_shards"
    final = root / key
    manifest = final / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        return Prepared(final, int(row_len), m["splits"], key)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.tmp-"))
    try:
        splits = _build(spec, tokenizer, row_len, tmp, progress, rows_per_shard)
        fallback = splits.pop("_fallback")
        if splits["validation"]["docs"] == 0 and spec.eval is None:
            # a small corpus whose hash split held out nothing: hold out its document of smallest hash
            # (still a pure function of the texts), so every run has an evaluation split
            if splits["train"]["docs"] < 2:
                raise DataError(f"{spec.train.describe()}: {splits['train']['docs']} document(s); a held-out split "
                                "needs at least 2 (or pass --eval-data)")
            for f in tmp.iterdir():
                f.unlink()
            splits = _build(spec, tokenizer, row_len, tmp, progress, rows_per_shard, frozenset([fallback]))
            splits.pop("_fallback")
        for s, what in (("train", spec.train), ("validation", spec.eval or spec.train)):
            if splits[s]["tokens"] == 0:
                raise DataError(f"{what.describe()}: no non-empty document for the {s} split")
        (tmp / "manifest.json").write_text(json.dumps({"key": key_dict, "splits": splits}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not manifest.is_file():        # not a concurrent builder that won the rename: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = json.loads(manifest.read_text())
    return Prepared(final, int(row_len), m["splits"], key)
