"""Preparing your own data: throughput and peak memory of streaming a corpus into array_record shards.

    .venv/bin/python experiments/data_prep_bench.py [--copies 10] [--tokenizer bpe] [--workdir /tmp/v4jax_prep]

Writes the shipped corpus (CPython stdlib sources) ``--copies`` times as one JSON-lines file (each
copy's documents prefixed so the texts differ), prepares it with ``v4jax.data.shards`` (tokenize,
hash split, pack into 257-token rows, write shards) and prints one JSON line: MB of text, seconds,
MB/s, rows, shard bytes on disk, peak RSS before and after, and the reuse time (a prepared corpus is
found by its fingerprint).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--tokenizer", default="bpe")
    ap.add_argument("--workdir", default="/tmp/v4jax_prep")
    args = ap.parse_args()

    from v4jax.data.corpus import read_corpus
    from v4jax.data.shards import UserData, prepare_user_data
    from v4jax.data.sources import FileSource
    from v4jax.data.tokenizer import get_tokenizer

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "corpus").mkdir(parents=True)
    src = work / "corpus" / "all.jsonl"
    docs = read_corpus()
    with open(src, "w") as f:
        for k in range(args.copies):
            for d in docs:
                f.write(json.dumps({"text": f"# copy {k}\n" + d["text"]}) + "\n")
    tok = get_tokenizer(args.tokenizer)
    spec = UserData(FileSource(str(work / "corpus")))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    prep = prepare_user_data(spec, tok, 257, work / "cache", progress=False)
    dt = time.perf_counter() - t
    t = time.perf_counter()
    prepare_user_data(spec, tok, 257, work / "cache", progress=False)
    reuse = time.perf_counter() - t
    s = prep.summary()
    mb = sum(v["bytes"] for v in s.values()) / 1e6
    disk = sum(p.stat().st_size for p in prep.directory.iterdir())
    print(json.dumps({"copies": args.copies, "tokenizer": tok.fingerprint, "text_MB": round(mb, 1),
                      "seconds": round(dt, 2), "MB_per_s": round(mb / dt, 2),
                      "docs": {k: v["docs"] for k, v in s.items()}, "rows": {k: v["rows"] for k, v in s.items()},
                      "bytes_per_token": s["train"]["bytes_per_token"], "shards_MB": round(disk / 1e6, 1),
                      "peak_rss_MiB_before": round(rss0), "peak_rss_MiB_after":
                          round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "reuse_s": round(reuse, 3), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
