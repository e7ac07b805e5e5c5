"""The shipped text corpus: a fixed subset of the CPython 3.12 standard library's source, one document per file.

The corpus lives in ``corpus/stdlib.jsonl.xz`` beside this file (written once by ``make_corpus.py``; see
``corpus/NOTICE.md`` for provenance and the PSF license). Each line is ``{"name": "json/decoder.py", "text": ...}``.
The split is a pure function of the document name (``split_of``), so it never depends on file order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_PATH = CORPUS_DIR / "stdlib.jsonl.xz"
SPLITS = ("train", "validation")
VALIDATION_PER_MILLE = 50          # ~5 % of documents are held out


def split_of(name: str) -> str:
    """``"validation"`` for ~5 % of names (stable SHA-256 hash of the name), else ``"train"``."""
    h = int.from_bytes(hashlib.sha256(b"v4jax-split:" + name.encode("utf-8")).digest()[:8], "big")
    return "validation" if h % 1000 < VALIDATION_PER_MILLE else "train"


def iter_corpus(path: str | Path = CORPUS_PATH, split: str | None = None) -> Iterator[dict]:
    """Yield ``{"name", "text"}`` dicts in file order (sorted by name), optionally only those of one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if split is None or split_of(doc["name"]) == split:
                yield doc


def read_corpus(split: str | None = None, path: str | Path = CORPUS_PATH) -> list[dict]:
    return list(iter_corpus(path, split))


@functools.cache
def _sha256_file(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def corpus_sha256(path: str | Path = CORPUS_PATH) -> str:
    """SHA-256 of the compressed corpus file (keys the prepared dataset and the token caches)."""
    st = Path(path).stat()
    return _sha256_file(str(path), st.st_mtime_ns, st.st_size)
