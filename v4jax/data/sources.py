"""Your own documents: text, JSON lines, JSON, Parquet files, or a prepared TFDS dataset, streamed.

    >>> from v4jax.data.sources import FileSource, TfdsSource
    >>> src = FileSource("my_corpus/")                  # a directory, a glob ("data/**/*.jsonl") or one file
    >>> for name, text in src.documents(): ...          # one pass, file by file, never the whole corpus in memory
    >>> src = TfdsSource("my_dataset:1.0.0", split="train", data_dir="~/tensorflow_datasets")

Formats, by file suffix (a trailing ``.gz`` is read through gzip):

* ``.txt`` ``.text`` ``.md`` ``.rst``: one document per file (UTF-8).
* ``.jsonl`` ``.ndjson``: one JSON object per line, the document in its ``text_field`` (default ``"text"``).
* ``.json``: a JSON array of such objects, or JSON lines.
* ``.parquet``: the ``text_field`` column (read in record batches with ``pyarrow``, which TFDS already installs).

A directory is searched recursively for these suffixes (hidden files and directories skipped). Files are read in
sorted path order, so a source always yields the same documents in the same order. Bad input gets one
``DataError`` naming the file (and line): a path that matches nothing, an empty or unreadable file, text that is not
UTF-8, a JSON line that is not an object or lacks the text field. Empty documents (``""``) inside JSON / Parquet are
skipped and counted; an empty ``.txt`` file is an error (it is almost always a mistake).

Why hand-written: ``tfds`` has no builder for "whatever files the user has" without TensorFlow
(``tfds.folder_dataset`` covers images and translation only), and ``grain`` reads record files, not text.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


class DataError(ValueError):
    """Bad user data: the message names the path (and line or column) at fault."""


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, sufs in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("json", JSON_SUFFIXES),
                       ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(sufs):
            return None if (kind == "parquet" and path.name.lower().endswith(".gz")) else kind
    return None


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_files(spec: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(root, files)``: the files a ``--data`` value names, sorted; ``root`` is what names are relative to."""
    text = os.path.expanduser(str(spec))
    if not text:
        raise DataError("--data: empty path")
    if globlib.has_magic(text):
        hits = sorted(Path(p) for p in globlib.glob(text, recursive=True) if os.path.isfile(p))
        if not hits:
            raise DataError(f"--data {str(spec)!r}: the pattern matches no file")
        bad = [p for p in hits if _kind(p) is None]
        if bad:
            raise DataError(f"--data {str(spec)!r}: {str(bad[0])!r} has an unsupported suffix "
                            f"(supported: {', '.join(SUFFIXES)}, optionally .gz)")
        root = Path(os.path.commonpath([str(p.parent) for p in hits]))
        return root, hits
    path = Path(text)
    if path.is_dir():
        hits = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path) and _kind(p) is not None)
        if not hits:
            raise DataError(f"--data {str(spec)!r}: the directory holds no {', '.join(SUFFIXES)} file")
        return path, hits
    if path.is_file():
        if _kind(path) is None:
            raise DataError(f"--data {str(spec)!r}: unsupported suffix (supported: {', '.join(SUFFIXES)}, "
                            "optionally .gz)")
        return path.parent, [path]
    raise DataError(f"--data {str(spec)!r}: no such file or directory")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") \
        else open(path, encoding="utf-8")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{str(path)!r}: cannot read ({e})") from None


def _decode(raw: bytes, path: Path, where: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r}{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") \
            from None


def _field(obj, field: str, path: Path, where: str) -> str | None:
    if not isinstance(obj, dict):
        raise DataError(f"{str(path)!r}{where}: expected a JSON object with a {field!r} field, got "
                        f"{type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
        raise DataError(f"{str(path)!r}{where}: no {field!r} field (fields: {keys}); choose one with --text-field")
    val = obj[field]
    if val is None:
        return None
    if not isinstance(val, str):
        raise DataError(f"{str(path)!r}{where}: field {field!r} is a {type(val).__name__}, not a string")
    return val


def _text_docs(path: Path, name: str) -> Iterator[tuple[str, str]]:
    raw = _read_bytes(path)
    if not raw.strip():
        raise DataError(f"{str(path)!r}: the file is empty")
    yield name, _decode(raw, path)


def _jsonl_docs(path: Path, name: str, field: str) -> Iterator[tuple[str, str]]:
    n = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                n += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{str(path)!r} line {lineno}: invalid JSON ({e.msg})") from None
                text = _field(obj, field, path, f" line {lineno}")
                if text:
                    yield f"{name}:{lineno}", text
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{str(path)!r}: cannot read ({e})") from None
    if n == 0:
        raise DataError(f"{str(path)!r}: the file is empty")


def _json_docs(path: Path, name: str, field: str) -> Iterator[tuple[str, str]]:
    raw = _read_bytes(path)
    text = _decode(raw, path)
    if not text.strip():
        raise DataError(f"{str(path)!r}: the file is empty")
    if not text.lstrip().startswith("["):
        yield from _jsonl_docs(path, name, field)          # a .json file of JSON lines
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{str(path)!r} line {e.lineno}: invalid JSON ({e.msg})") from None
    for i, obj in enumerate(rows):
        val = _field(obj, field, path, f" item {i}")
        if val:
            yield f"{name}:{i}", val


def _parquet_docs(path: Path, name: str, field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:          # pyarrow raises ArrowInvalid / OSError subclasses for a corrupt file
        raise DataError(f"{str(path)!r}: not a readable Parquet file ({e})") from None
    cols = pf.schema_arrow.names
    if field not in cols:
        raise DataError(f"{str(path)!r}: no column {field!r} (columns: {', '.join(cols[:8])}); "
                        "choose one with --text-field")
    if pf.metadata.num_rows == 0:
        raise DataError(f"{str(path)!r}: the file is empty")
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for val in batch.column(0).to_pylist():
                if val is not None and not isinstance(val, str):
                    raise DataError(f"{str(path)!r} row {i}: column {field!r} holds {type(val).__name__}, "
                                    "not strings")
                if val:
                    yield f"{name}:{i}", val
                i += 1
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{str(path)!r}: cannot read row {i} ({e})") from None


@dataclass(frozen=True)
class FileSource:
    """Documents from files (see the module docstring): ``documents()`` yields ``(name, text)``; the name
    is the path relative to the source root, with ``:line`` / ``:row`` for record files."""

    path: str
    text_field: str = "text"

    def files(self) -> tuple[Path, list[Path]]:
        return resolve_files(self.path)

    def documents(self) -> Iterator[tuple[str, str]]:
        root, files = self.files()
        for f in files:
            name = f.relative_to(root).as_posix()
            kind = _kind(f)
            if kind == "text":
                yield from _text_docs(f, name)
            elif kind == "jsonl":
                yield from _jsonl_docs(f, name, self.text_field)
            elif kind == "json":
                yield from _json_docs(f, name, self.text_field)
            else:
                yield from _parquet_docs(f, name, self.text_field)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files()[1])

    def fingerprint(self) -> str:
        """Changes when any file is added, removed, resized or touched, or the text field changes."""
        root, files = self.files()
        h = hashlib.sha256(json.dumps({"kind": "files", "field": self.text_field}).encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.path} ({len(self.files()[1])} files)"


def parse_tfds(spec: str) -> tuple[str, str | None]:
    """``"NAME[:VERSION]"`` → ``(name, version or None)``."""
    name, _, version = str(spec).partition(":")
    if not name:
        raise DataError(f"--tfds {spec!r}: expected NAME or NAME:VERSION")
    return name, (version or None)


def _tfds_builder(spec: str, data_dir):
    import tensorflow_datasets as tfds

    name, version = parse_tfds(spec)
    data_dir = None if data_dir is None else os.path.expanduser(str(data_dir))
    try:
        builder = tfds.builder(name, version=version, data_dir=data_dir)
    except Exception as e:        # DatasetNotFoundError and friends; the registry message is long
        raise DataError(f"--tfds {spec!r}: no such dataset prepared under {data_dir or 'the default data_dir'} "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not builder.is_prepared():
        raise DataError(f"--tfds {spec!r}: not prepared under {builder.data_dir} (run its download_and_prepare "
                        "there first; v4jax reads prepared datasets only)")
    return builder


@dataclass(frozen=True)
class TfdsSource:
    """Documents of one split of a TFDS dataset already prepared under ``data_dir`` (read with
    ``as_data_source``: array_record random access, no TensorFlow)."""

    spec: str                      # NAME[:VERSION]
    split: str = "train"
    data_dir: str | None = None
    text_field: str = "text"

    def builder(self):
        return _tfds_builder(self.spec, self.data_dir)

    def splits(self) -> list[str]:
        return list(self.builder().info.splits)

    def documents(self) -> Iterator[tuple[str, str]]:
        b = self.builder()
        if self.split not in b.info.splits:
            raise DataError(f"--tfds {self.spec!r}: no split {self.split!r} (has {', '.join(b.info.splits)})")
        src = b.as_data_source(split=self.split)
        if len(src) == 0:
            raise DataError(f"--tfds {self.spec!r}: split {self.split!r} is empty")
        feats = list(b.info.features.keys()) if hasattr(b.info.features, "keys") else []
        if feats and self.text_field not in feats:
            raise DataError(f"--tfds {self.spec!r}: no feature {self.text_field!r} (features: {', '.join(feats)}); "
                            "choose one with --text-field")
        for i in range(len(src)):
            val = src[i][self.text_field]
            val = val.decode("utf-8", errors="strict") if isinstance(val, bytes) else str(val)
            if val:
                yield f"{self.split}/{i}", val

    def total_bytes(self) -> int | None:
        return None

    def fingerprint(self) -> str:
        b = self.builder()
        key = {"kind": "tfds", "name": b.name, "version": str(b.version), "dir": str(b.data_dir),
               "split": self.split, "field": self.text_field,
               "examples": int(b.info.splits[self.split].num_examples) if self.split in b.info.splits else -1}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"tfds {self.spec} [{self.split}]"


def in_eval_split(text: str, fraction: float) -> bool:
    """The deterministic hash split: a document is held out when the SHA-256 of its text falls in the first
    ``fraction`` of the hash space, so a document and its exact duplicates always land in the same split
    (no train/eval leakage through copies) whatever the file order or names."""
    h = int.from_bytes(hashlib.sha256(b"v4jax-eval:" + text.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0 ** 64
