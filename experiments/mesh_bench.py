"""What a mesh costs: per-device memory and the collectives XLA inserts in the train step.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        .venv/bin/python experiments/mesh_bench.py [--preset tiny] [--batch 8] [--seq 256] \
        [--meshes none data=8 fsdp=8 fsdp=2,expert=4 data=2,fsdp=2,expert=2 data=2,expert=2,tensor=2] \
        [--out experiments/results/mesh]

For each mesh the real train step (``v4jax.train.step.make_train_step``: forward, backward, V4 Muon +
AdamW, bias update) is compiled ahead of time for the simulated CPU devices, from abstract
arguments carrying the state and batch shardings (nothing is allocated). Reported per device:
XLA's memory analysis (arguments, outputs, temporaries), and, from the compiled HLO, every
collective (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute) with the bytes of
its result, summed by kind (bytes one device receives or holds after it). The simulated devices
share two CPU cores, so step times here say nothing about scaling and are not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DT = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8,
       "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def collective_bytes(hlo: str) -> dict:
    """``{kind: [count, bytes]}`` over the HLO's collective instructions (result shapes; tuples summed;
    the ``-start`` halves of async pairs counted, the ``-done`` halves not)."""
    out = {k: [0, 0] for k in COLLECTIVES}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\(", line)
        if not m:
            continue
        shape, op = m.groups()
        kind = op[:-6] if op.endswith("-start") else op
        if kind not in out or op.endswith("-done"):
            continue
        n = 0
        for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
            if dt not in _DT:
                continue
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            n += size * _DT[dt]
        out[kind][0] += 1
        out[kind][1] += n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--meshes", nargs="+", default=["none", "data=8", "fsdp=8", "fsdp=2,expert=4",
                                                    "data=2,fsdp=2,expert=2", "data=2,expert=2,tensor=2"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import jax

    from v4jax.parallel.mesh import batch_sharding, make_mesh
    from v4jax.parallel.placement import logical_specs
    from v4jax.params import abstract_variables
    from v4jax.train.config import train_preset
    from v4jax.train.optimizer import make_optimizer
    from v4jax.train.step import abstract_state, make_train_step, state_shardings

    tc = train_preset(a.preset, [f"batch_size={a.batch}", f"seq_len={a.seq}", "dense_attention_steps=0",
                                 "indexer_warmup_steps=0"])
    params = abstract_variables(tc.model)["params"]
    tx = make_optimizer(tc.optim, params, logical_specs(tc.model))
    state = abstract_state(tc, tx)
    batch = {k: jax.ShapeDtypeStruct((a.batch, a.seq + 1), "int32") for k in ("tokens", "segment_ids")}
    rows = []
    for spec in a.meshes:
        t0 = time.perf_counter()
        if spec == "none":
            fn = make_train_step(tc, tx)
            args = (state, batch)
            compiled = fn.lower(*args).compile()
            n_dev = 1
        else:
            mesh = make_mesh(spec)
            sh = state_shardings(tc, tx, mesh)
            bsh = batch_sharding(mesh, a.batch)
            put = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            args = (jax.tree.map(put, state, sh), {k: put(v, bsh) for k, v in batch.items()})
            step = make_train_step(tc, tx, mesh=mesh)
            compiled = step.lower(*args).compile()
            n_dev = mesh.size
        mem = compiled.memory_analysis()
        coll = collective_bytes(compiled.as_text())
        row = {"mesh": spec, "devices": n_dev, "compile_s": round(time.perf_counter() - t0, 1),
               "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
               "temp_bytes": int(mem.temp_size_in_bytes),
               "collectives": {k: {"count": c, "bytes": b} for k, (c, b) in coll.items() if c}}
        rows.append(row)
        mib = lambda b: f"{b / 2**20:8.1f}"
        cs = ", ".join(f"{k} {v['count']}x {v['bytes'] / 2**20:.1f} MiB" for k, v in row["collectives"].items()) or "none"
        print(f"{spec:28s} args {mib(row['argument_bytes'])} MiB  temp {mib(row['temp_bytes'])} MiB  "
              f"compile {row['compile_s']:6.1f} s  collectives: {cs}", flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"mesh_{a.preset}_b{a.batch}_s{a.seq}.json")
        with open(path, "w") as f:
            json.dump({"preset": a.preset, "batch": a.batch, "seq": a.seq, "jax": jax.__version__,
                       "devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "rows": rows}, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
