"""``benchmarks.py peak``: the fp32 matmul peak of jax (and torch), the MFU denominator."""

from __future__ import annotations

import os
import time

import decode_bench as db  # experiments/decode_bench.py
import jax
import jax.numpy as jnp

from bench.common import TRAIN_WORKER, banner, meta, table, write_json


def jax_peak(n: int = 2048, reps: int = 10) -> dict:
    """fp32 matmul peak: jitted ``jnp.dot`` of two random ``[n, n]``, warm, best of ``reps``."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32)
    b = jax.random.normal(k2, (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    for _ in range(2):
        f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    best = min(times)
    med = sorted(times)[(reps - 1) // 2]
    return dict(ok=True, n=n, reps=reps, best_s=best, median_s=med, gflops=2 * n**3 / best / 1e9,
                gflops_median=2 * n**3 / med / 1e9, dtype="float32", precision="default")


_run_worker = db.run_worker


def torch_peak(torch_python: str, n: int, reps: int, timeout: float = 600) -> dict:
    ok, note = db.probe_torch(torch_python)
    if not ok:
        return dict(ok=False, error=note)
    cmd = [torch_python, TRAIN_WORKER, "--peak", "--n", str(n), "--reps", str(reps),
           "--threads", str(os.cpu_count() or 1)]
    return _run_worker(cmd, timeout, "torch peak worker")


def print_peak(jp: dict, tp: dict | None) -> None:
    rows = [["jax (jnp.dot, jit)", jp["n"], f"{jp['best_s'] * 1e3:.1f}", f"{jp['gflops']:.1f}", f"{jp['gflops_median']:.1f}"]]
    if tp is not None:
        if tp.get("ok"):
            rows.append([f"torch {tp['versions']['torch']} (matmul, {tp['threads']} threads)", tp["n"],
                         f"{tp['best_s'] * 1e3:.1f}", f"{tp['gflops']:.1f}", f"{tp['gflops_median']:.1f}"])
        else:
            rows.append(["torch", "-", "-", "failed", tp.get("error", "")[:80]])
    table(["fp32 matmul", "n", "best ms", "GFLOP/s (best)", "GFLOP/s (median)"], rows)


def cmd_peak(args) -> dict:
    load = banner("peak")
    jp = jax_peak(args.peak_n, args.peak_reps)
    tp = torch_peak(args.torch_python, args.peak_n, args.peak_reps) if args.torch_python else None
    print_peak(jp, tp)
    res = {**meta(load), "kind": "peak", "jax": jp, "torch": tp,
           "torch_over_jax": (tp["gflops"] / jp["gflops"]) if tp and tp.get("ok") else None}
    write_json(args.out, "peak", res)
    return res
