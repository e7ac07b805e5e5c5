"""Compile #21's two distributed pieces for a TPU topology on this CPU machine (libtpu's
compile-only devices; nothing runs): capacity expert parallelism with its ``ragged_all_to_all``
exchange (the form XLA:CPU cannot run, so the test suite checks only the padded ``all_to_all``
form), forward and backward, and the distributed Muon update. Prints the collectives in each
compiled HLO and XLA's cost analysis per device, so a regression to an all-gather is visible.

    pip download libtpu==0.0.51 --no-deps -d /tmp/w && unzip -q /tmp/w/libtpu-*.whl -d /tmp/libtpu
    python experiments/pod/ep_muon_aot.py --libtpu /tmp/libtpu --topology v5p:2x2x2 --mesh fsdp=2,expert=4

On a machine with an accelerator (a lent GPU/TPU), ``--local`` compiles the same programs for
the local devices and also RUNS them on random inputs, printing the median time per call (the
values are checked against one device by tests/test_parallel.py, on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _fill(aval, n_experts: int, seed: int):
    """A random array for ``aval`` (ids in ``[0, n_experts)``), placed with its sharding."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    if np.issubdtype(aval.dtype, np.integer):
        x = rng.integers(0, n_experts, size=aval.shape).astype(aval.dtype)
    else:
        x = (0.02 * rng.normal(size=aval.shape)).astype(aval.dtype)
    return jax.device_put(x, aval.sharding)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libtpu", help="folder of an unpacked libtpu wheel (compile for --topology)")
    ap.add_argument("--topology", default="v5p:2x2x2")
    ap.add_argument("--local", action="store_true", help="compile and run on the local devices instead")
    ap.add_argument("--mesh", default="fsdp=2,expert=4")
    ap.add_argument("--capacity", type=float, default=1.5)
    ap.add_argument("--tokens", type=int, default=4096, help="global tokens of the MoE call")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.local and not args.libtpu:
        ap.error("give --libtpu DIR (TPU AOT) or --local")

    from v4jax.parallel.mesh import parse_mesh
    from v4jax.parallel.plan import hlo_collectives, topology_mesh

    axes = parse_mesh(args.mesh)
    if args.local:
        from v4jax.parallel.mesh import make_mesh
        mesh = make_mesh(args.mesh)
    else:
        mesh = topology_mesh(axes, args.libtpu, args.topology)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from v4jax.config import preset
    from v4jax.moe.expert_parallel import experts_all_to_all
    from v4jax.parallel.mesh import mesh_context
    from v4jax.sharding import batch_axes
    from v4jax.train.optimizer import OptimizerConfig, make_optimizer

    cfg = preset("small")
    E, K, d, I = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim, cfg.moe_inter_dim
    N = args.tokens
    sds = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    tok = P(batch_axes(mesh))
    t = "tensor" if "tensor" in axes else None
    avals = [sds((N, d), jnp.bfloat16, tok), sds((N, K), jnp.int32, tok), sds((N, K), jnp.float32, tok),
             sds((E, d, I), jnp.float32, P("expert", None, t)), sds((E, I, d), jnp.float32, P("expert", t, None)),
             sds((E, d, I), jnp.float32, P("expert", None, t))]
    impl = "blocked" if args.local and jax.default_backend() == "cpu" else "ragged"

    def moe(x, idx, w, w1, w2, w3):
        return experts_all_to_all(x, idx, w, w1, w2, w3, cfg.swiglu_limit, jnp.bfloat16, impl, mesh, args.capacity)

    def moe_grad(x, idx, w, w1, w2, w3):
        loss = lambda x, w1, w2, w3: jnp.sum(moe(x, idx, w, w1, w2, w3)[0] ** 2)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w1, w2, w3)

    from v4jax.parallel.placement import logical_specs, variables_shardings
    from v4jax.params import abstract_variables
    params = abstract_variables(cfg)["params"]
    tx = make_optimizer(OptimizerConfig(total_steps=10, decay_start=8, warmup_steps=0, muon_ns_dtype="bfloat16"),
                        params, logical_specs(cfg))
    psh = variables_shardings(cfg, mesh, abstract_variables(cfg))["params"]
    pav = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, psh)
    with mesh_context(mesh):
        sav = jax.eval_shape(tx.init, pav)
    muon = lambda g, s, p: tx.update(g, s, p)[0]

    rows = {}
    for name, fn, av in (("moe capacity a2a fwd", moe, avals), ("moe capacity a2a bwd", moe_grad, avals),
                         ("distributed muon update", muon, (pav, sav, pav))):
        t0 = time.time()
        with mesh_context(mesh):
            c = jax.jit(fn).trace(*av).lower().compile()
        cost = c.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        mem = c.memory_analysis()
        row = {"compile_s": round(time.time() - t0, 1), "collectives": hlo_collectives(c.as_text()),
               "flops": cost.get("flops"), "bytes accessed": cost.get("bytes accessed"),
               "optimal_seconds": cost.get("optimal_seconds"),
               "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
               "argument_bytes": getattr(mem, "argument_size_in_bytes", None)}
        if args.local:
            inputs = [_fill(a, E, i) for i, a in enumerate(jax.tree.leaves(av))]
            inputs = jax.tree.unflatten(jax.tree.structure(av), inputs)
            times = []
            for _ in range(4):
                t1 = time.perf_counter()
                jax.block_until_ready(c(*inputs))
                times.append(time.perf_counter() - t1)
            row["run_s_median"] = float(np.median(times[1:]))
        rows[name] = row
        print(f"{name}: compiled in {row['compile_s']} s; collectives {row['collectives']}; flops {row['flops']}, "
              f"temporaries {row['temp_bytes']} B" + (f"; {row['run_s_median'] * 1e3:.2f} ms per call"
                                                       if "run_s_median" in row else ""))
    out = {"mesh": axes, "topology": None if args.local else args.topology, "capacity": args.capacity,
           "tokens": N, "impl": impl, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
