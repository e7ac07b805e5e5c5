"""Compile time against depth: the Flash layer schedule at the ``tiny`` preset's widths, 6 layers vs
all 43, timing ``V4Model.init`` + the first forward, and the first training step (compile + run).

With the scanned layer stack (``v4jax.model.layout``) the 43-layer model compiles three stacks
(window x2, hash CSA x1, (HCA, CSA) x20), so its compile time should be close to the 6-layer one.

    python experiments/compile_bench.py                 # both depths, each in a fresh process
    python experiments/compile_bench.py --layers 43     # one depth, in this process

Prints one JSON line per depth and writes ``experiments/results/compile/compile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def flash_schedule_tiny(n_layers: int):
    from v4jax.config import preset

    flash = preset("flash")
    return preset("tiny", name=f"flash-schedule-{n_layers}", n_layers=n_layers,
                  layer_types=flash.layer_types[:n_layers], n_hash_layers=min(3, n_layers))


def measure(n_layers: int, seq: int, batch: int, train: bool) -> dict:
    import jax
    import numpy as np

    import v4jax
    from v4jax.model.layout import layer_plan

    cfg = flash_schedule_tiny(n_layers)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    t0 = time.perf_counter()
    model = v4jax.V4Model.init(cfg, seed=0)
    jax.block_until_ready(model.variables)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(model(ids))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(model(ids))
    t_second = time.perf_counter() - t0
    out = {"n_layers": n_layers, "stacks": len(layer_plan(cfg)), "seq": seq, "batch": batch,
           "init_s": round(t_init, 2), "first_forward_s": round(t_first, 2),
           "init_plus_first_forward_s": round(t_init + t_first, 2), "steady_forward_s": round(t_second, 3)}
    if train:
        import jax.numpy as jnp

        from v4jax.train.config import train_preset
        from v4jax.train.optimizer import make_optimizer
        from v4jax.train.step import init_state, make_train_step

        tc = train_preset("tiny")
        tc = type(tc).from_dict({**tc.to_dict(), "model": {**tc.to_dict()["model"], **_model_dict(cfg)},
                                 "seq_len": seq, "batch_size": batch})
        tx = make_optimizer(tc.optim, model.params)
        state = init_state(tc, tx, jax.tree.map(jnp.array, model.variables))
        tokens = np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
        batch_d = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones((batch, seq + 1), jnp.int32)}
        step = make_train_step(tc, tx)
        t0 = time.perf_counter()
        state, m = step(state, batch_d)
        jax.block_until_ready(m)
        out["first_train_step_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        state, m = step(state, batch_d)
        jax.block_until_ready(m)
        out["steady_train_step_s"] = round(time.perf_counter() - t0, 3)
    return out


def _model_dict(cfg) -> dict:
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["layer_types"] = list(d["layer_types"])
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="depths (default: 6 and 43, subprocesses)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-train", action="store_true", help="skip the first training step")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compile", "compile.json"))
    a = ap.parse_args(argv)
    if a.layers and len(a.layers) == 1:
        print(json.dumps(measure(a.layers[0], a.seq, a.batch, not a.no_train)), flush=True)
        return 0
    rows = []
    for n in a.layers or [6, 43]:
        cmd = [sys.executable, os.path.abspath(__file__), "--layers", str(n), "--seq", str(a.seq),
               "--batch", str(a.batch)] + (["--no-train"] if a.no_train else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return res.returncode
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) >= 2:
        base, deep = rows[0], rows[-1]
        ratio = deep["init_plus_first_forward_s"] / base["init_plus_first_forward_s"]
        print(f"init + first forward: {deep['n_layers']} layers / {base['n_layers']} layers = {ratio:.2f}x")
        if "first_train_step_s" in deep:
            print(f"first train step: {deep['first_train_step_s']} s vs {base['first_train_step_s']} s "
                  f"({deep['first_train_step_s'] / base['first_train_step_s']:.2f}x)")
    import jax

    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"rows": rows, "jax": jax.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
                   "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
