"""Serving numbers (issue #14): MTP self-speculative decoding and the on-disk prefix cache.

    .venv/bin/python experiments/serving_bench.py --workdir experiments/runs/tiny \\
        [--batches 1 8] [--prompt-len 64] [--new-tokens 96] [--prefixes 4096 16384] \\
        [--out experiments/results/serving]

* ``speculative``: the ``tiny`` model trained by ``experiments/train_tiny.sh`` (its newest
  checkpoint, MTP block included). Prompts: the first ``--prompt-len`` tokens of the first
  validation documents of the shipped corpus (BPE). For each batch size B: plain greedy
  ``generate`` and ``generate(..., speculative="mtp")`` are each run once to compile, then timed
  over ``--repeats`` runs; tokens/s = B * new tokens / wall time (prefill included in both; the
  prompt is short). Reports the acceptance rate (accepted drafts / drafts over live rows), the
  mean tokens per main-model pass, whether the tokens equal plain greedy (they must), and the
  same for temperature 0.8 sampling (acceptance only: sampled sequences differ by construction).
* ``prefix``: ``tiny`` with random weights and ``max_seq_len`` raised to fit ``--prefixes``
  (speed does not depend on the weights). For a shared prefix of L tokens and a 32-token
  suffix: prefill time without the cache (cold), the first request with an empty cache (prefill
  + store), and later requests with other suffixes (restore + extend of the suffix), median of
  ``--repeats``; every shape is compiled first (the same requests on another prefix), so the
  times are steady-state; bytes of the stored entry, and bytes per token for ``tiny``, ``flash`` and ``pro``
  from the cache pytree (``v4jax.inference.prefix_cache.bytes_per_token``, both cache formats).

Writes ``serving.json`` under ``--out`` and prints a summary. The machine's other load skews the
absolute numbers; plain and speculative alternate so their ratio is measured under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np


def prompts(tok, n: int, length: int) -> np.ndarray:
    from v4jax.data.pipeline import tokenized_split

    _, ids, offsets = tokenized_split("validation", tokenizer=tok)
    rows = []
    for k in range(len(offsets) - 1):
        doc = ids[offsets[k]:offsets[k + 1]]
        if len(doc) >= length:
            rows.append(doc[:length])
        if len(rows) == n:
            break
    if len(rows) < n:        # few long documents: slide over the concatenated split
        rows += [ids[i * length:(i + 1) * length] for i in range(n - len(rows))]
    return np.stack(rows).astype(np.int32)


def bench_speculative(workdir: str, batches, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    from v4jax.checkpoint import load_workdir

    model = load_workdir(workdir)
    tok_path = os.path.join(workdir, "tokenizer.json")
    from v4jax.data.tokenizer import get_tokenizer

    tok = get_tokenizer(tok_path if os.path.exists(tok_path) else "bpe")
    out = {"workdir": os.path.abspath(workdir), "prompt_len": prompt_len, "new_tokens": new_tokens, "rows": []}
    for B in batches:
        ids = prompts(tok, B, prompt_len)
        kw = dict(max_new_tokens=new_tokens, stop_tokens=())
        plain = model.generate(ids, **kw)                       # compile
        model.generate(ids, speculative="mtp", **kw)
        t_plain, t_spec, st = [], [], {}
        for _ in range(repeats):
            t0 = time.perf_counter()
            plain = model.generate(ids, **kw)
            t_plain.append(time.perf_counter() - t0)
            st = {}
            t0 = time.perf_counter()
            spec = model.generate(ids, speculative="mtp", stats=st, **kw)
            t_spec.append(time.perf_counter() - t0)
        same = bool(np.array_equal(plain, spec))
        sampled = {}
        model.generate(ids, temperature=0.8, seed=1, speculative="mtp", stats=sampled, **kw)
        tp, ts = statistics.median(t_plain), statistics.median(t_spec)
        row = {"batch": B, "plain_tok_s": B * new_tokens / tp, "spec_tok_s": B * new_tokens / ts,
               "speedup": tp / ts, "acceptance": st["acceptance"], "tokens_per_pass": (st["drafted"] + st["accepted"]) / max(st["drafted"], 1),
               "main_passes": st["steps"], "identical_to_plain_greedy": same,
               "sampled_T0.8_acceptance": sampled["acceptance"], "plain_s": tp, "spec_s": ts}
        out["rows"].append(row)
        print(f"speculative B={B}: plain {row['plain_tok_s']:.1f} tok/s, mtp {row['spec_tok_s']:.1f} tok/s "
              f"({row['speedup']:.2f}x), acceptance {row['acceptance']:.3f} (sampled T=0.8: "
              f"{row['sampled_T0.8_acceptance']:.3f}), identical: {same}", flush=True)
    return out


def bench_prefix(prefixes, repeats: int, suffix: int = 32) -> dict:
    import jax

    import v4jax
    from v4jax.config import preset
    from v4jax.inference.prefix_cache import PrefixCache, bytes_per_token, entry_payload_bytes, fixed_state_bytes

    out = {"suffix": suffix, "rows": [], "bytes_per_token": {}}
    for name in ("tiny", "flash", "pro"):
        cfg = preset(name)
        out["bytes_per_token"][name] = {}
        for label, fmt, dt in (("fp32", "native", "float32"), ("bf16", "native", "bfloat16"), ("fp8", "fp8", None)):
            try:
                out["bytes_per_token"][name][label] = {
                    "per_token": bytes_per_token(cfg, fmt, dt),
                    "fixed_MiB": fixed_state_bytes(cfg, fmt, dt) / 2**20,
                    "entry_4k_MiB": entry_payload_bytes(cfg, 4096, fmt, dt) / 2**20}
            except ValueError as e:          # tiny: fp8 needs head_dim - rope_dim a multiple of 64
                out["bytes_per_token"][name][label] = f"n/a ({e})"
        print(f"bytes per prefix token, {name}: {out['bytes_per_token'][name]}", flush=True)
    cfg = preset("tiny", max_seq_len=max(prefixes) + suffix + 8)
    model = v4jax.V4Model.init(cfg, seed=0)
    rng = np.random.default_rng(0)
    for L in prefixes:
        shared = rng.integers(3, cfg.vocab_size, L)
        reqs = [np.concatenate([shared, rng.integers(3, cfg.vocab_size, suffix)])[None].astype(np.int32)
                for _ in range(repeats + 2)]
        cold = []
        for r in reqs[:repeats + 1]:
            t0 = time.perf_counter()
            jax.block_until_ready(model.generate(r, 1, stop_tokens=()))
            cold.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as w:   # compiles: the same request shapes on another prefix
            warm_req = np.concatenate([rng.integers(3, cfg.vocab_size, L), reqs[0][0, L:]])[None].astype(np.int32)
            warm_cache = PrefixCache(w, max_bytes=8 << 30)
            for _ in range(2):
                model.generate(warm_req, 1, stop_tokens=(), prefix_cache=warm_cache)
        with tempfile.TemporaryDirectory() as d:
            cache = PrefixCache(d, max_bytes=8 << 30)
            t0 = time.perf_counter()
            model.generate(reqs[0], 1, stop_tokens=(), prefix_cache=cache)
            first = time.perf_counter() - t0
            warm = []
            for r in reqs[1:repeats + 2]:
                t0 = time.perf_counter()
                model.generate(r, 1, stop_tokens=(), prefix_cache=cache)
                warm.append(time.perf_counter() - t0)
            disk = cache.stats["bytes"]
            hits = cache.stats["hits"]
        row = {"prefix": L, "cold_s": statistics.median(cold[1:]), "first_with_cache_s": first,
               "hit_s": statistics.median(warm[1:]), "speedup": statistics.median(cold[1:]) / statistics.median(warm[1:]),
               "bytes_on_disk": disk, "hits": hits}
        out["rows"].append(row)
        print(f"prefix {L}: cold prefill {row['cold_s']:.2f} s, first request (prefill + store) {first:.2f} s, "
              f"hit {row['hit_s']:.3f} s ({row['speedup']:.1f}x), entry {disk / 2**20:.1f} MiB", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="experiments/runs/tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prefixes", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", choices=["speculative", "prefix"], action="append", default=[])
    p.add_argument("--out", default="experiments/results/serving")
    a = p.parse_args(argv)
    res = {}
    if "speculative" not in a.skip:
        res["speculative"] = bench_speculative(a.workdir, a.batches, a.prompt_len, a.new_tokens, a.repeats)
    if "prefix" not in a.skip and a.prefixes:
        res["prefix"] = bench_prefix(a.prefixes, a.repeats)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "serving.json")
    if os.path.exists(path):             # a partial rerun (--skip) keeps the other part's numbers
        with open(path) as f:
            res = {**json.load(f), **res}
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {os.path.join(a.out, 'serving.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
