"""Torch side of ``experiments/benchmarks.py`` (``train`` and ``peak``). Run it under a Python that
has torch + transformers; it must never import jax or v4jax.

    python experiments/_hf_train_worker.py --peak [--n 2048 --reps 10] [--threads 2]
    python experiments/_hf_train_worker.py --ckpt DIR (--tokens ids.npy | --batch B --seq T) \
        [--steps 10 --warmup 2 --lr 1e-4 --threads 2]

``--peak``: fp32 ``torch.matmul`` of two random ``[n, n]`` matrices, best of ``--reps`` after two
warm-up calls; GFLOP/s = 2 n^3 / t.

Training: ``DeepseekV4ForCausalLM.from_pretrained(DIR, dtype=torch.float32)``, ``model.train()``,
``torch.optim.AdamW(model.parameters(), lr)`` (torch defaults otherwise: betas (0.9, 0.999),
eps 1e-8, weight_decay 0.01, no clipping). Each step: ``model(input_ids=ids, labels=ids,
use_cache=False)`` (transformers shifts the labels internally), ``loss.backward()``,
``opt.step()``, ``opt.zero_grad()``. ``--warmup`` untimed steps, then ``--steps`` timed ones.
``ids`` is ``--tokens`` (an int ``.npy`` ``[B, T]``) or random ids ``[--batch, --seq]``.

Prints ONE JSON object on stdout (everything else goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def versions() -> dict:
    import torch
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__)


def run_peak(n: int, reps: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float32)
    b = torch.randn(n, n, generator=g, dtype=torch.float32)
    for _ in range(2):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)
    best = min(times)
    med = sorted(times)[(len(times) - 1) // 2]
    return dict(ok=True, n=n, reps=reps, best_s=best, median_s=med, gflops=2 * n**3 / best / 1e9,
                gflops_median=2 * n**3 / med / 1e9, threads=torch.get_num_threads(), versions=versions())


def run_train(args) -> dict:
    import numpy as np
    import torch
    from transformers import DeepseekV4ForCausalLM

    if args.tokens:
        ids = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    else:
        if not (args.batch and args.seq):
            raise SystemExit("give --tokens or both --batch and --seq")
        ids = None
    t = time.perf_counter()
    model, info = DeepseekV4ForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32, output_loading_info=True)
    load_s = time.perf_counter() - t
    if ids is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    B, T = ids.shape
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    losses, step_s = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss.detach())  # CPU: synchronous anyway
        step_s.append(time.perf_counter() - t)
        losses.append(lv)
        del out, loss
        print(f"[hf] step {i}: {step_s[-1]:.2f}s loss {lv:.4f}", file=sys.stderr, flush=True)

    timed = step_s[args.warmup:]
    total = sum(timed)
    return dict(
        ok=True, batch=B, seq=T, steps=args.steps, warmup=args.warmup, lr=args.lr,
        load_s=load_s,
        first_step_s=step_s[0],
        timed_s=total,
        tokens_per_s=B * T * len(timed) / total,
        step_ms_median=1e3 * sorted(timed)[(len(timed) - 1) // 2],
        step_ms_min=1e3 * min(timed),
        step_ms_all=[1e3 * s for s in timed],
        first_loss=losses[0], final_loss=losses[-1], losses=losses,
        n_params=n_params, n_trainable=n_trainable,
        missing_keys=list(info.get("missing_keys", [])),
        unexpected_keys=list(info.get("unexpected_keys", [])),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        experts_implementation=getattr(model.config, "_experts_implementation", None),
        peak_rss_gb=peak_rss_gb(),
        threads=torch.get_num_threads(),
        versions=versions(),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak", action="store_true", help="measure the fp32 matmul peak instead of training")
    ap.add_argument("--n", type=int, default=2048, help="--peak: matrix size")
    ap.add_argument("--reps", type=int, default=10, help="--peak: timed repeats (best is reported)")
    ap.add_argument("--ckpt")
    ap.add_argument("--tokens", help=".npy int array [B, T]")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import torch

    assert "jax" not in sys.modules and "v4jax" not in sys.modules
    torch.set_num_threads(args.threads)
    if args.peak:
        res = run_peak(args.n, args.reps)
    else:
        if not args.ckpt:
            ap.error("--ckpt is required unless --peak")
        if args.steps < 1 or args.warmup < 0:
            ap.error("--steps must be >= 1 and --warmup >= 0")
        res = run_train(args)
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
