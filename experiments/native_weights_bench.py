#!/usr/bin/env python
"""Native FP8 / FP4 weights against dequantized ones, in one run (issue #22 item 4).

For each preset: random weights are exported in the official storage (``save(quantize="official",
dtype="bfloat16")``: FP8 128x128 blocks, FP4 experts packed, the rest bf16 / fp32), then loaded
twice, ``weights="dequantized"`` (everything fp32, the default) and ``weights="native"``.
Reported: checkpoint bytes, resident bytes (measured from the arrays), peak host allocations
during the load (``tracemalloc``: numpy reports its buffers), load time, logits difference,
greedy tokens equal, prefill time and decode tokens/s (``experiments/decode_bench.py``'s
timing: 1 warm-up step, the rest timed; the two models alternate, same prompt).

    python experiments/native_weights_bench.py                       # tiny and small, B = 1 and 8
    python experiments/native_weights_bench.py --presets tiny --batch 1 --new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import decode_bench as db  # noqa: E402  (experiments/decode_bench.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench.common import meta, table, write_json  # noqa: E402

import v4jax  # noqa: E402
from v4jax.weights import load_variables  # noqa: E402


def _load(path: str, weights: str):
    tracemalloc.start()
    t = time.perf_counter()
    try:
        v, cfg = load_variables(path, weights=weights)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return v4jax.V4Model(cfg, v), time.perf_counter() - t, peak


def run(preset: str, batches, context: int, new_tokens: int, seed: int) -> list[dict]:
    cfg = v4jax.preset(preset, max_seq_len=context + new_tokens + 8, n_mtp_layers=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="native_bench_") as d:
        v4jax.V4Model.init(cfg, seed=seed).save(d, dtype="bfloat16", quantize="official")
        on_disk = os.path.getsize(os.path.join(d, "model.safetensors"))
        _load(d, "native")                                      # warm imports outside the measurement
        models = {}
        for w in ("dequantized", "native"):
            m, load_s, peak = _load(d, w)
            models[w] = m
            rows.append(dict(preset=preset, weights=w, checkpoint_mb=on_disk / 1e6,
                             resident_mb=sum(x.nbytes for x in jax.tree.leaves(m.variables)) / 1e6,
                             load_peak_mb=peak / 1e6, load_s=load_s))
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, cfg.vocab_size, (max(batches), context)).astype(np.int32)
        ld, ln = (np.asarray(models[w](ids[:1])) for w in ("dequantized", "native"))
        diff = float(np.abs(ld - ln).max() / np.abs(ld).max())
        for B in batches:
            res = {w: db.bench_v4jax(models[w], ids[:B], new_tokens) for w in ("dequantized", "native")}
            same = bool(np.array_equal(res["dequantized"]["tokens"], res["native"]["tokens"]))
            for r in rows[-2:]:
                x = res[r["weights"]]
                r[f"B{B}"] = dict(prefill_s=x["prefill_s"], tok_s=x["tok_s"], step_ms=x["step_ms_median"],
                                  greedy_equal=same, logits_rel_diff=diff)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "native"))
    a = ap.parse_args(argv)
    rows = []
    for p in a.presets:
        rows += run(p, a.batch, a.context, a.new_tokens, a.seed)
    head = ["preset", "weights", "ckpt MB", "resident MB", "load peak MB", "load s"]
    for B in a.batch:
        head += [f"B={B} prefill s", f"B={B} tok/s"]
    body = []
    for r in rows:
        line = [r["preset"], r["weights"], f"{r['checkpoint_mb']:.1f}", f"{r['resident_mb']:.1f}",
                f"{r['load_peak_mb']:.1f}", f"{r['load_s']:.2f}"]
        for B in a.batch:
            line += [f"{r[f'B{B}']['prefill_s']:.3f}", f"{r[f'B{B}']['tok_s']:.1f}"]
        body.append(line)
    table(head, body)
    for r in rows[1::2]:
        print(f"{r['preset']}: native/dequantized logits max |diff| / max |logit| = "
              f"{r[f'B{a.batch[0]}']['logits_rel_diff']:.2e}; greedy tokens equal: "
              f"{all(r[f'B{B}']['greedy_equal'] for B in a.batch)}")
    print("wrote", write_json(a.out, "native_weights", dict(meta=meta(), rows=rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
