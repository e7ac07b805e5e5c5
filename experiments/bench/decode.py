"""``benchmarks.py decode``: cached greedy decode against transformers (``decode_bench.py``'s functions)."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time

import decode_bench as db  # experiments/decode_bench.py
import jax
import numpy as np

import v4jax
from bench.common import _bars, _plt, _save_png, banner, fmt, meta, table, write_json
from bench.peak import jax_peak


def cmd_decode(args, peak: dict | None = None) -> dict:
    load = banner("decode")
    peak = peak or jax_peak(args.peak_n, args.peak_reps)
    have_hf, hf_note = db.probe_torch(args.torch_python)
    print(f"transformers side: {hf_note if have_hf else 'SKIPPED - ' + hf_note}", flush=True)
    N = args.new_tokens
    cfg = v4jax.preset("tiny", max_seq_len=max(args.contexts) + N)
    t = time.perf_counter()
    model = v4jax.V4Model.init(cfg, seed=args.seed)
    jax.block_until_ready(model.variables)
    print(f"model: {model}, max_seq_len {cfg.max_seq_len}, runtime {model.runtime}; init {time.perf_counter() - t:.1f}s; "
          f"{N} new tokens (1 warm-up + {N - 1} timed), greedy", flush=True)
    n_active = v4jax.count_params(cfg).active
    rows = []
    workdir = tempfile.mkdtemp(prefix="bench_decode_")
    try:
        ckpt = os.path.join(workdir, "ckpt")
        model.save(ckpt)
        rng = np.random.default_rng(args.seed)
        for B in args.batch:
            for C in args.contexts:
                prompt = rng.integers(0, cfg.vocab_size, (B, C)).astype(np.int32)
                jx = db.bench_v4jax(model, prompt, N)
                jx["mfu"] = jx["tok_s"] * 2 * n_active / (peak["gflops"] * 1e9)
                print(f"[B={B} C={C}] v4jax: prefill {jx['prefill_s']:.2f}s (+{jx['prefill_compile_s']:.1f}s compile), "
                      f"{jx['step_ms_median']:.1f} ms/step, {jx['tok_s']:.1f} tok/s", flush=True)
                hf = None
                if have_hf:
                    hf = db.bench_hf(args.torch_python, ckpt, prompt, N, workdir, args.hf_timeout)
                    if hf["ok"]:
                        print(f"[B={B} C={C}] transformers: prefill {hf['prefill_s']:.2f}s, "
                              f"{hf['step_ms_median']:.1f} ms/step, {hf['tok_s']:.1f} tok/s", flush=True)
                    else:
                        print(f"[B={B} C={C}] transformers: FAILED - {hf['error']}", flush=True)
                ok = hf is not None and hf["ok"]
                agree = (db.agreement(jx["tokens"], hf["tokens"])
                         if ok and hf["tokens"].shape == jx["tokens"].shape else None)
                jx.pop("tokens")
                if hf is not None:
                    hf.pop("tokens", None)
                rows.append(dict(batch=B, context=C, v4jax=jx, transformers=hf,
                                 ratio_tok_s=jx["tok_s"] / hf["tok_s"] if ok else None,
                                 ratio_prefill=hf["prefill_s"] / jx["prefill_s"] if ok else None,
                                 greedy_agreement=agree))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    del model
    gc.collect()

    print()
    table(["B", "context", "v4jax tok/s", "transformers tok/s", "ratio", "v4jax prefill s", "transformers prefill s",
           "v4jax ms/step", "transformers ms/step", "greedy agreement"],
          [[r["batch"], r["context"], f"{r['v4jax']['tok_s']:.1f}",
            fmt(r["transformers"]["tok_s"]) if r["transformers"] and r["transformers"]["ok"]
            else ("skipped" if r["transformers"] is None else "failed"),
            fmt(r["ratio_tok_s"], ".2f"), f"{r['v4jax']['prefill_s']:.2f}",
            fmt(r["transformers"].get("prefill_s") if r["transformers"] else None, ".2f"),
            f"{r['v4jax']['step_ms_median']:.1f}",
            fmt(r["transformers"].get("step_ms_median") if r["transformers"] else None),
            r["greedy_agreement"] or "-"] for r in rows])
    for r in rows:
        if r["transformers"] is not None and not r["transformers"]["ok"]:
            print(f"transformers at B={r['batch']} C={r['context']}: {r['transformers']['error']}")
    res = {**meta(load), "kind": "decode", "preset": "tiny", "new_tokens": N, "contexts": args.contexts,
           "batches": args.batch, "peak": peak, "n_active": n_active,
           "mfu_note": "decode MFU = tok/s * 2 * n_active / jax peak (attention over the cache not counted)",
           "transformers_note": hf_note, "method": "experiments/decode_bench.py (bench_v4jax, bench_hf)",
           "rows": rows}
    write_json(args.out, "decode", res)
    if not args.no_plot and rows:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
        _bars(ax, [f"B={r['batch']}\nC={r['context']}" for r in rows],
              {"v4jax": [r["v4jax"]["tok_s"] for r in rows],
               "transformers": [r["transformers"]["tok_s"] if r["transformers"] and r["transformers"]["ok"] else None
                                for r in rows]}, "decode tokens/s", log=True)
        ax.set_title(f"tiny greedy decode, {N - 1} timed steps", fontsize=9)
        _save_png(plt, fig, args.out, "decode")
    return res
