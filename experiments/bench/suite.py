"""``benchmarks.py all``: peak, train (tiny adamw / muon, small adamw) and decode in one run, ``all.json``."""

from __future__ import annotations

import argparse
import os
import shlex
import time

from bench.common import (
    _bars,
    _cpu_model,
    _plt,
    _save_png,
    fmt,
    meta,
    table,
    write_json,
)
from bench.decode import cmd_decode
from bench.passthrough import run_passthrough
from bench.peak import cmd_peak
from bench.train import train_one


def cmd_all(args) -> dict:
    t_all = time.perf_counter()
    peak_res = cmd_peak(args)
    peak = peak_res["jax"]
    hf_cache: dict = {}
    trains = []
    for preset, opt, mtp in (("tiny", "adamw", False), ("tiny", "muon", True), ("small", "adamw", False)):
        trains.append(train_one(args, preset, opt, mtp, peak, hf_cache))
    dec_args = argparse.Namespace(**{**vars(args), "contexts": args.contexts, "batch": args.decode_batch})
    dec = cmd_decode(dec_args, peak)
    extra = {}
    if args.with_long:
        extra["long_context"] = run_passthrough(args.out, "long-context", shlex.split(args.long_args))
        extra["compile"] = run_passthrough(args.out, "compile", shlex.split(args.compile_args))

    summary_train = [dict(name=r["name"], like_for_like=r["like_for_like"],
                          v4jax_tokens_per_s=r["v4jax"]["tokens_per_s"],
                          transformers_tokens_per_s=(r["transformers"] or {}).get("tokens_per_s"),
                          ratio=r["ratio_tokens_per_s"], v4jax_mfu=r["v4jax"]["mfu"],
                          transformers_mfu=(r["transformers"] or {}).get("mfu"),
                          v4jax_compile_s=r["v4jax"]["compile_s"],
                          optimizer_update_fraction=(r["v4jax"].get("optimizer_update") or {}).get("fraction_of_step"))
                     for r in trains]
    summary_dec = [dict(batch=r["batch"], context=r["context"], v4jax_tok_s=r["v4jax"]["tok_s"],
                        transformers_tok_s=(r["transformers"] or {}).get("tok_s"), ratio=r["ratio_tok_s"],
                        greedy_agreement=r["greedy_agreement"]) for r in dec["rows"]]
    res = {**meta(), "kind": "all", "wall_s": time.perf_counter() - t_all,
           "peak": {"jax_gflops": peak["gflops"],
                    "torch_gflops": (peak_res["torch"] or {}).get("gflops") if peak_res["torch"] else None},
           "train": summary_train, "decode": summary_dec,
           "files": {"peak": "peak.json", "train": [r["name"] + ".json" for r in trains], "decode": "decode.json",
                     **({"long_context": "long_context.json", "compile": "compile.json"} if args.with_long else {})},
           "long_context_rc": extra.get("long_context", {}).get("rc"), "compile_rc": extra.get("compile", {}).get("rc")}
    print("\n=== summary ===")
    print(f"fp32 matmul peak: jax {peak['gflops']:.1f} GFLOP/s"
          + (f", torch {res['peak']['torch_gflops']:.1f} GFLOP/s" if res["peak"]["torch_gflops"] else ""))
    table(["train", "v4jax tok/s", "transformers tok/s", "ratio", "v4jax MFU", "like for like"],
          [[s["name"], f"{s['v4jax_tokens_per_s']:.0f}", fmt(s["transformers_tokens_per_s"], ".0f"),
            fmt(s["ratio"], ".2f"), f"{100 * s['v4jax_mfu']:.2f}%", "yes" if s["like_for_like"] else "no"]
           for s in summary_train])
    table(["decode B", "context", "v4jax tok/s", "transformers tok/s", "ratio", "greedy agreement"],
          [[s["batch"], s["context"], f"{s['v4jax_tok_s']:.1f}", fmt(s["transformers_tok_s"]), fmt(s["ratio"], ".2f"),
            s["greedy_agreement"] or "-"] for s in summary_dec])
    write_json(args.out, "all", res)
    if not args.no_plot:
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        _bars(axes[0], [s["name"].replace("train_", "").replace("_b", "\nb") for s in summary_train],
              {"v4jax": [s["v4jax_tokens_per_s"] for s in summary_train],
               "transformers": [s["transformers_tokens_per_s"] for s in summary_train]}, "train tokens/s")
        axes[0].set_title("training throughput", fontsize=9)
        _bars(axes[1], [f"B={s['batch']}\nC={s['context']}" for s in summary_dec],
              {"v4jax": [s["v4jax_tok_s"] for s in summary_dec],
               "transformers": [s["transformers_tok_s"] for s in summary_dec]}, "decode tokens/s", log=True)
        axes[1].set_title("tiny greedy decode", fontsize=9)
        fig.suptitle(f"v4jax vs transformers, {_cpu_model()}, {os.cpu_count()} CPUs, fp32", fontsize=10)
        _save_png(plt, fig, args.out, "all")
    return res
