"""Cost of the V4 optimizer update and the effect of bf16 Newton-Schulz operands (issue #10).

    .venv/bin/python experiments/muon_bench.py [--preset tiny] [--reps 5]

For the preset's parameters and one real gradient (a tiny batch through the model's loss), times
the jitted ``tx.update + apply_updates`` of ``make_optimizer`` for each variant:

* ``fp32, bucketed``: one batched Newton-Schulz per matrix shape, fp32 operands (the default);
* ``bf16, bucketed``: bf16 operands with fp32 accumulation (``muon_ns_dtype="bfloat16"``);
* ``fp32, per leaf``: ``muon_bucket=False`` (one NS loop per parameter leaf);
* ``AdamW only``: optax.adamw on every parameter, for scale.

and reports the effect of bf16 on the update: relative Frobenius difference and cosine of the
Muon-updated leaves against fp32, and the range of the orthogonalised singular values. Writes
``experiments/results/muon/muon.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import v4jax
from v4jax.train.config import train_preset
from v4jax.train.optimizer import MUON, hybrid_newton_schulz, make_optimizer, param_labels


def timed(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "muon"))
    a = ap.parse_args()

    tc = train_preset(a.preset)
    model = v4jax.V4Model.init(tc.model, seed=0)
    params = model.params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, tc.model.vocab_size, (2, 65)), jnp.int32)

    def loss(p):
        out = model.module.apply({**model.variables, "params": p}, ids[:, :-1])
        lp = jax.nn.log_softmax(out["logits"], -1)
        return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(params)
    labels = param_labels(params)
    n_muon = sum(int(np.prod(g.shape)) for g, lb in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if lb == MUON)

    def variant(**kw):   # no warm-up: the first update has the peak LR (a zero LR makes every update 0)
        return make_optimizer(dataclasses.replace(tc.optim, warmup_steps=0, **kw), params)

    txs = {"fp32, bucketed": variant(muon_ns_dtype="float32", muon_bucket=True),
           "bf16, bucketed": variant(muon_ns_dtype="bfloat16", muon_bucket=True),
           "fp32, per leaf": variant(muon_ns_dtype="float32", muon_bucket=False),
           "AdamW only": optax.adamw(1e-4)}
    rows, updates = {}, {}
    for name, tx in txs.items():
        state = tx.init(params)
        f = jax.jit(lambda g, s, p, tx=tx: optax.apply_updates(p, tx.update(g, s, p)[0]))
        upd = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[0])
        rows[name] = {"update_ms": timed(f, grads, state, params, reps=a.reps)}
        updates[name] = upd(grads, state, params)
        print(f"{name:16s} update + apply {rows[name]['update_ms']:8.1f} ms", flush=True)

    ref, bf = updates["fp32, bucketed"], updates["bf16, bucketed"]
    num = den = dot = nb = 0.0
    for r, b, lb in zip(jax.tree.leaves(ref), jax.tree.leaves(bf), jax.tree.leaves(labels)):
        if lb != MUON:
            continue
        r, b = np.asarray(r, np.float64), np.asarray(b, np.float64)
        num += np.sum((r - b) ** 2)
        den += np.sum(r ** 2)
        dot += np.sum(r * b)
        nb += np.sum(b ** 2)
    per_leaf = np.asarray(rows["fp32, per leaf"]["update_ms"])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 256, 256)), jnp.float32)
    sv = {}
    for dt in ("float32", "bfloat16"):
        s = np.linalg.svd(np.asarray(hybrid_newton_schulz(x, matmul_dtype=jnp.dtype(dt)), np.float64), compute_uv=False)
        sv[dt] = [float(s.min()), float(s.max())]
    res = {"preset": a.preset, "muon_params": n_muon, "variants": rows,
           "bf16_vs_fp32": {"relative_frobenius_diff": float(np.sqrt(num / den)),
                            "cosine": float(dot / np.sqrt(den * nb))},
           "singular_values_after_ns_256x256": sv,
           "bucket_speedup": float(per_leaf / rows["fp32, bucketed"]["update_ms"]),
           "bf16_speedup": rows["fp32, bucketed"]["update_ms"] / rows["bf16, bucketed"]["update_ms"],
           "host": os.uname().nodename, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__}
    print(json.dumps({k: res[k] for k in ("bf16_vs_fp32", "singular_values_after_ns_256x256", "bucket_speedup",
                                           "bf16_speedup")}, indent=1))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "muon.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {os.path.join(a.out, 'muon.json')}")


if __name__ == "__main__":
    main()
