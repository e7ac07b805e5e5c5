"""Regenerate the shipped corpus and/or the BPE tokenizer (run once; the outputs are committed).

    python -m v4jax.data.make_corpus                 # corpus from this interpreter's stdlib, then the tokenizer
    python -m v4jax.data.make_corpus --tokenizer     # only retrain tokenizer.json from the shipped corpus

The corpus is a deterministic subset of the CPython standard library's ``.py`` sources (PSF license, see
``corpus/NOTICE.md``): one document per file, chosen by a stable hash of the relative path until a byte budget is
met, written sorted by name as compressed JSON lines. Because the stdlib differs between Python versions, the output is
shipped rather than rebuilt at run time; it was made with CPython 3.12.1. The tokenizer is trained on the train split
only and is reproducible from the shipped corpus (same ``tokenizer.json`` bytes on every run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from v4jax.data.corpus import CORPUS_DIR, CORPUS_PATH, corpus_sha256, read_corpus, split_of
from v4jax.data.tokenizer import TOKENIZER_PATH, train_bpe

# Directories that are tests, generated tables, vendored tools or machine-specific; files that are build artefacts.
EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "encodings", "pydoc_data",
                "lib-dynload", "turtledemo", "ensurepip", "__phello__"}
EXCLUDE_PREFIXES = ("_sysconfigdata", "config-")
MIN_BYTES, MAX_BYTES = 512, 256 * 1024
DEFAULT_BUDGET = 8_000_000              # raw UTF-8 bytes; compresses to ~1.7 MB with xz -9e


def candidate_files(stdlib: Path) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if any(part in EXCLUDE_DIRS or part.startswith(EXCLUDE_PREFIXES) for part in rel.parts):
            continue
        if not MIN_BYTES <= p.stat().st_size <= MAX_BYTES:
            continue
        out.append((rel.as_posix(), p))
    return out


def select_documents(stdlib: Path, budget: int) -> list[dict]:
    """Files in order of SHA-256(name), each kept if it still fits in the byte budget; returned sorted by name."""
    cands = sorted(candidate_files(stdlib), key=lambda c: hashlib.sha256(b"v4jax-corpus:" + c[0].encode()).digest())
    docs, total = [], 0
    for name, path in cands:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace("\r\n", "\n")
        size = len(text.encode("utf-8"))
        if total + size > budget:
            continue
        if str(stdlib) in text or sys.prefix in text:          # never ship machine-specific paths
            continue
        docs.append({"name": name, "text": text})
        total += size
    return sorted(docs, key=lambda d: d["name"])


def write_corpus(docs: list[dict], path: Path = CORPUS_PATH) -> None:
    payload = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    # FORMAT_XZ with CHECK_CRC64 and preset 9|EXTREME: the bytes depend only on the payload.
    path.write_bytes(lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                   preset=9 | lzma.PRESET_EXTREME))


def corpus_stats(tokenizer=None, source: str | None = None) -> dict:
    source = source or f"CPython {sys.version.split()[0]} standard library (Lib/*.py subset)"
    stats = {"source": source,
             "file": CORPUS_PATH.name, "compressed_bytes": CORPUS_PATH.stat().st_size,
             "sha256": corpus_sha256(), "splits": {}}
    for split in ("train", "validation"):
        docs = read_corpus(split)
        s = {"docs": len(docs), "bytes": sum(len(d["text"].encode("utf-8")) for d in docs)}
        if tokenizer is not None:
            s["tokens"] = sum(len(ids) for ids in tokenizer.encode_batch([d["text"] for d in docs]))
            s["bytes_per_token"] = round(s["bytes"] / s["tokens"], 3)
        stats["splits"][split] = s
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", action="store_true", help="only retrain tokenizer.json from the shipped corpus")
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="raw corpus bytes")
    args = ap.parse_args(argv)

    if not args.tokenizer:
        t0 = time.time()
        docs = select_documents(args.stdlib, args.budget)
        write_corpus(docs)
        shutil.copyfile(args.stdlib / "LICENSE.txt", CORPUS_DIR / "LICENSE-PSF.txt")
        print(f"corpus: {len(docs)} docs from {args.stdlib} -> {CORPUS_PATH} "
              f"({CORPUS_PATH.stat().st_size} bytes) in {time.time() - t0:.1f}s")

    t0 = time.time()
    tok = train_bpe(d["text"] for d in read_corpus("train"))
    tok.save(TOKENIZER_PATH)
    print(f"tokenizer: vocab {tok.vocab_size}, {tok.fingerprint} -> {TOKENIZER_PATH} in {time.time() - t0:.1f}s")

    manifest = CORPUS_DIR / "manifest.json"
    # with --tokenizer the corpus is the shipped one: keep its recorded source, whatever Python runs this
    source = json.loads(manifest.read_text())["source"] if args.tokenizer and manifest.exists() else None
    stats = corpus_stats(tok, source)
    stats["tokenizer"] = tok.fingerprint
    manifest.write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    assert all(split_of(d["name"]) in ("train", "validation") for d in read_corpus())


if __name__ == "__main__":
    main()
