"""Pallas attention kernels vs their XLA references (the jit-compiled ``reference.py`` of each
kernel), forward and forward+backward.

    python experiments/attention_bench.py                       # accelerator: T = 4K..64K
    python experiments/attention_bench.py --seq-lens 256 512    # CPU default (interpret mode)
    python experiments/attention_bench.py --full                # CPU: the full 4K..64K range (very slow)
    python experiments/attention_bench.py --heads 64 --head-dim 512 --topk 512 --ratio 4 --window 128 --backward

Kernels: ``sparse`` (CSA: window + top-k of T/ratio entries), ``compressed`` (HCA: window + all
visible of T/hca-ratio entries), ``indexer`` (scores over T/ratio entries). On CPU the kernels
run in Pallas interpret mode, so the CPU numbers only show that the script works. The dense
references materialise ``[B, H, T, T + N]`` logits; where that would not fit (``--ref-mem-gb``)
the reference column says ``skip`` (and ``OOM`` when it was tried and failed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import (compressed_attention, compressed_attention_reference, indexer_scores,
                            indexer_scores_reference, sparse_attention, sparse_attention_reference)


def topk_lists(B, T, N, K, ratio, seed=0):
    """Distinct visible picks per query: ``(a_t + j*P) mod nvis(t)`` with a prime P > N (scattered
    like real top-k, cheap at 64K), -1 beyond ``nvis``."""
    P = 1_000_003
    nvis = jnp.minimum((jnp.arange(T) + 1) // ratio, N)[None, :, None]
    a = jax.random.randint(jax.random.PRNGKey(seed), (B, T, 1), 0, P)
    j = jnp.arange(K)[None, None, :]
    idx = (a + j * P) % jnp.maximum(nvis, 1)
    return jnp.where(j < nvis, idx, -1).astype(jnp.int32)


def timed(fn, args, iters):
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def with_grad(f, n_diff):
    def g(*args):
        def loss(*d):
            o = f(*d, *args[n_diff:])
            return jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0).astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=tuple(range(n_diff)))(*args[:n_diff])
    return g


def cases(args, T, dtype):
    B, H, c, W = args.batch, args.heads, args.head_dim, args.window
    key = jax.random.PRNGKey(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q = jax.random.normal(k1, (B, T, H, c), dtype)
    kv = jax.random.normal(k2, (B, T, c), dtype)
    sink = jnp.zeros((H,), jnp.float32)
    out = []
    if "sparse" in args.kernels:
        N = T // args.ratio
        comp = jax.random.normal(k3, (B, N, c), dtype)
        tk = topk_lists(B, T, N, min(args.topk, N), args.ratio)
        kern = lambda q, kv, s, cm, tk: sparse_attention(q, kv, s, cm, tk, window=W)
        ref = lambda q, kv, s, cm, tk: sparse_attention_reference(q, kv, s, cm, tk, window=W)
        mem = B * H * T * (T + N) * 4 * 3
        out.append((f"sparse(K={args.topk},r={args.ratio})", kern, ref, (q, kv, sink, comp, tk), 4, mem))
    if "compressed" in args.kernels:
        N = T // args.hca_ratio
        comp = jax.random.normal(k3, (B, N, c), dtype)
        kern = lambda q, kv, s, cm: compressed_attention(q, kv, s, cm, ratio=args.hca_ratio, window=W)
        ref = lambda q, kv, s, cm: compressed_attention_reference(q, kv, s, cm, ratio=args.hca_ratio, window=W)
        mem = B * H * T * (T + N) * 4 * 3
        out.append((f"compressed(r={args.hca_ratio})", kern, ref, (q, kv, sink, comp), 4, mem))
    if "indexer" in args.kernels:
        N = T // args.ratio
        qi = jax.random.normal(k4, (B, T, args.index_heads, args.index_dim), dtype)
        ki = jax.random.normal(k3, (B, N, args.index_dim), dtype)
        w = jax.random.normal(k2, (B, T, args.index_heads), jnp.float32) * args.index_heads ** -0.5
        kern = lambda q, k, w: indexer_scores(q, k, w, ratio=args.ratio)
        ref = lambda q, k, w: indexer_scores_reference(q, k, w, ratio=args.ratio)
        mem = B * T * N * args.index_heads * 4 * 3
        out.append((f"indexer(nI={args.index_heads})", kern, ref, (qi, ki, w), 3, mem))
    return out


def main():
    on_cpu = jax.default_backend() == "cpu"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None)
    ap.add_argument("--full", action="store_true", help="the full 4K..64K range even on CPU")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=None, help="query heads (default 64; 4 on CPU)")
    ap.add_argument("--head-dim", type=int, default=None, help="c (default 512; 64 on CPU)")
    ap.add_argument("--topk", type=int, default=None, help="top-k entries (default 512; 16 on CPU)")
    ap.add_argument("--ratio", type=int, default=4, help="CSA compression ratio (sparse, indexer)")
    ap.add_argument("--hca-ratio", type=int, default=128, help="HCA ratio (compressed)")
    ap.add_argument("--window", type=int, default=None, help="sliding window (default 128; 32 on CPU)")
    ap.add_argument("--index-heads", type=int, default=None, help="indexer heads (default 64; 4 on CPU)")
    ap.add_argument("--index-dim", type=int, default=None, help="indexer head dim (default 128; 32 on CPU)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kernels", nargs="+", default=["sparse", "compressed", "indexer"])
    ap.add_argument("--backward", action="store_true", help="also time forward+backward")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--ref-mem-gb", type=float, default=None, help="skip references needing more (est.)")
    args = ap.parse_args()
    small = on_cpu and not args.full
    pick = lambda v, big, cpu: v if v is not None else (cpu if small else big)
    args.heads = pick(args.heads, 64, 4)
    args.head_dim = pick(args.head_dim, 512, 64)
    args.topk = pick(args.topk, 512, 16)
    args.window = pick(args.window, 128, 32)
    args.index_heads = pick(args.index_heads, 64, 4)
    args.index_dim = pick(args.index_dim, 128, 32)
    iters = pick(args.iters, 5, 3)
    seq_lens = args.seq_lens or ([256, 512] if small else [4096, 8192, 16384, 32768, 65536])
    dev = jax.devices()[0]
    if args.ref_mem_gb is None:
        stats = getattr(dev, "memory_stats", lambda: None)() or {}
        args.ref_mem_gb = 0.5 * stats.get("bytes_limit", 16 << 30) / 2 ** 30
    dtype = jnp.dtype(args.dtype)
    print(f"device: {dev.device_kind} ({jax.default_backend()}{', Pallas interpret mode' if on_cpu else ''}), "
          f"jax {jax.__version__}, {dtype.name}, B={args.batch} H={args.heads} c={args.head_dim} "
          f"window={args.window} topk={args.topk} ratio={args.ratio} hca_ratio={args.hca_ratio} "
          f"indexer {args.index_heads}x{args.index_dim}, median of {iters}")
    hdr = f"{'kernel':24} {'T':>6} {'pass':8} {'pallas ms':>11} {'xla ref ms':>11} {'ref/pallas':>10}"
    print(hdr)
    print("-" * len(hdr))
    passes = [("fwd", False)] + ([("fwd+bwd", True)] if args.backward else [])
    for T in seq_lens:
        for name, kern, ref, inputs, n_diff, ref_bytes in cases(args, T, dtype):
            for pname, bwd in passes:
                fk = jax.jit(with_grad(kern, n_diff) if bwd else kern)
                fr = jax.jit(with_grad(ref, n_diff) if bwd else ref)
                try:
                    tk = timed(fk, inputs, iters)
                    tk_s = f"{tk:11.2f}"
                except Exception as e:  # noqa: BLE001 - a benchmark row, not a test
                    tk, tk_s = None, f"{'OOM' if 'RESOURCE' in str(e) else 'error':>11}"
                if ref_bytes * (3 if bwd else 1) > args.ref_mem_gb * 2 ** 30:
                    tr, tr_s = None, f"{'skip':>11}"
                else:
                    try:
                        tr = timed(fr, inputs, iters)
                        tr_s = f"{tr:11.2f}"
                    except Exception as e:  # noqa: BLE001
                        tr, tr_s = None, f"{'OOM' if 'RESOURCE' in str(e) else 'error':>11}"
                ratio = f"{tr / tk:10.2f}" if tk and tr else f"{'-':>10}"
                print(f"{name:24} {T:6d} {pname:8} {tk_s} {tr_s} {ratio}", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
