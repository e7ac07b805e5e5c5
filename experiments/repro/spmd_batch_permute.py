"""XLA SPMD partitioner bug (jax 0.12.0.1, XLA:CPU, 8 simulated devices): a sharded program gives
WRONG VALUES, silently. Found by ``tests/test_parallel.py`` when the #21 rules put a dense leaf's
contracted ``embed`` on ``tensor``; it is why ``v4jax.sharding.RULES`` has no ``("embed",
"tensor")`` fallback.

    u = einsum("btgi,gio->btgo", o, A).reshape(B, T, g * o)   # A's group dim on "tensor"
    y = u @ W                                                 # W [16, 32] on ("tensor", "expert")
    s = y @ G                                                 # G [32, 8] on ("tensor", None)

with ``o`` batch-sharded over ("data", "expert"). The compiled program contains a
collective-permute that swaps the batch blocks of devices (data, expert) = (0, 1) and (1, 0)
(``source_target_pairs={{2,4},{4,2},{3,5},{5,3},...}``) that nothing undoes: ``y`` and ``s`` come back
with batch blocks 1 and 2 exchanged. Same result with ``--gspmd`` (GSPMD propagation instead of
Shardy): the fault is in the shared SPMD partitioner, not in the propagation. Pinning ``u`` or ``y``
to the batch sharding (``--pin``) gives the right values.

    python experiments/repro/spmd_batch_permute.py [--gspmd] [--pin] [--hlo]

Prints the error against one device, and the error after swapping blocks 1 and 2 back (about 1e-5
when the bug is present). Exit status 1 when the bug is present, 0 when the values are right.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def main(argv: list[str]) -> int:
    jax.config.update("jax_num_cpu_devices", 8)
    if "--gspmd" in argv:
        jax.config.update("jax_use_shardy_partitioner", False)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "expert", "tensor"))
    ns = lambda *spec: NamedSharding(mesh, P(*spec))
    rng = np.random.default_rng(0)
    B, T, g, i, r, d, e = 8, 4, 2, 16, 8, 32, 8
    o = rng.standard_normal((B, T, g, i)).astype(np.float32)
    A = rng.standard_normal((g, i, r)).astype(np.float32)
    W = rng.standard_normal((g * r, d)).astype(np.float32)
    G = rng.standard_normal((d, e)).astype(np.float32)
    pin = "--pin" in argv

    def f(o, A, W, G):
        u = jnp.einsum("btgi,gio->btgo", o, A).reshape(B, T, g * r)
        y = u @ W
        if pin:
            y = jax.lax.with_sharding_constraint(y, ns(("data", "expert")))
        return y, y @ G

    ref = [np.asarray(x) for x in jax.jit(f)(o, A, W, G)]
    args = (jax.device_put(o, ns(("data", "expert"))), jax.device_put(A, ns("tensor")),
            jax.device_put(W, ns("tensor", "expert")), jax.device_put(G, ns("tensor", None)))
    out = jax.jit(f)(*args)
    swap = [0, 1, 4, 5, 2, 3, 6, 7]          # batch blocks of 2 rows: 1 <-> 2
    wrong = False
    for name, a, b in zip(("y", "s"), ref, out):
        b = np.asarray(b)
        err = float(np.abs(a - b).max() / np.abs(a).max())
        err_swapped = float(np.abs(a - b[swap]).max() / np.abs(a).max())
        wrong |= err > 1e-4
        print(f"{name}: rel err {err:.2e}; with batch blocks 1<->2 swapped back {err_swapped:.2e}")
    if "--hlo" in argv:
        print(jax.jit(f).lower(*args).compile().as_text())
    print(f"jax {jax.__version__}, partitioner {'GSPMD' if '--gspmd' in argv else 'Shardy'}, pin={pin}:",
          "WRONG VALUES" if wrong else "values right")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
