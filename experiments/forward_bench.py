"""Forward throughput of the reference (jnp oracle) model on this machine, fp32 and bf16.

    python experiments/forward_bench.py --preset tiny --batch 2 --seq 256

Prints compile time and tokens/s (median of --iters timed runs after one warm-up).
"""

import argparse
import statistics
import time

import jax
import numpy as np

import v4jax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
    base = v4jax.V4Model.init(v4jax.preset(args.preset))
    ids = np.random.default_rng(0).integers(0, base.cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    for dtype in ("float32", "bfloat16"):
        m = v4jax.V4Model(base.cfg.replace(dtype=dtype), base.variables)
        t = time.time()
        m(ids).block_until_ready()
        compile_s = time.time() - t
        times = []
        for _ in range(args.iters):
            t = time.time()
            m(ids).block_until_ready()
            times.append(time.time() - t)
        med = statistics.median(times)
        print(f"{args.preset} {dtype:9} B={args.batch} T={args.seq}: compile {compile_s:6.1f}s, "
              f"{med * 1e3:8.1f} ms/forward, {args.batch * args.seq / med:9.0f} tokens/s")


if __name__ == "__main__":
    main()
