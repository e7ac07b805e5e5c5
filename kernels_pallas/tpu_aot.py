"""Ahead-of-time checks of the accelerator wrappers from a machine without an accelerator.

``lowered_kernels(platform)`` lowers every kernel (forward and backward) for "tpu" (Mosaic) or
"cuda" (Triton, through an abstract H100 device) at a realistic-ish shape. Lowering runs the Pallas
block-shape checks and the kernel-body lowering rules, but NOT Mosaic's layout passes, which live
in libtpu. For those (unaligned slices, unsupported relayouts, VMEM overflow), compile for a real
TPU generation with libtpu's topology API, no TPU needed:

    pip download "libtpu==0.0.50.*" --no-deps -d /tmp/libtpu_whl   # the version jax 0.12 pins
    mkdir -p /tmp/libtpu && cd /tmp/libtpu && unzip -q /tmp/libtpu_whl/libtpu-*.whl
    python -m kernels_pallas.tpu_aot --libtpu /tmp/libtpu --topology v5e:2x2 \
        [--seq 8192 --heads 64 --head-dim 512 --topk 512]

(``test_lowering.py`` runs that when ``KERNELS_PALLAS_LIBTPU`` names such a folder.) Do not
install libtpu into a CPU-only environment's site-packages: jax would then try to start a TPU
backend at import.
"""

from __future__ import annotations

import argparse
import os
import sys

from kernels_pallas import compressed_attention, indexer_scores, sparse_attention
from kernels_pallas._common import abstract_gpu_mesh


def kernel_cases(T=512, H=8, c=128, N=None, K=16, window=128, n_idx_heads=8, idx_dim=128, dtype="bfloat16",
                 backend="tpu"):
    """``[(name, fn, avals)]``: forward (with lse) and backward of every kernel."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    N4 = T // 4 if N is None else N
    N128 = max(1, T // 128)
    S = jax.ShapeDtypeStruct
    B = 1

    def grad_of(f, n):
        def g(*a):
            def loss(*d):
                o = f(*d, *a[n:])
                o = o if isinstance(o, tuple) else (o,)
                return sum(jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0)) for x in o)
            return jax.grad(loss, argnums=tuple(range(n)))(*a[:n])
        return g

    sp = lambda q, kv, s, cm, tk, seg: sparse_attention(q, kv, s, cm, tk, window=window, segment_ids=seg,
                                                         return_lse=True, backend=backend)
    hca = lambda q, kv, s, cm, seg, cs: compressed_attention(q, kv, s, cm, ratio=128, window=window, segment_ids=seg,
                                                              comp_segment_ids=cs, return_lse=True, backend=backend)
    csa = lambda q, kv, s, cm: compressed_attention(q, kv, s, cm, ratio=4, window=window, return_lse=True,
                                                    backend=backend)
    win = lambda q, kv, s: compressed_attention(q, kv, s, None, ratio=4, window=window, return_lse=True,
                                                backend=backend)
    idx = lambda q, k, w, seg, ks: indexer_scores(q, k, w, ratio=4, segment_ids=seg, key_segment_ids=ks,
                                                  backend=backend)
    qa, kva, sa = S((B, T, H, c), dt), S((B, T, c), dt), S((H,), jnp.float32)
    seg = S((B, T), jnp.int32)
    cases = [
        ("sparse_attention", sp, [qa, kva, sa, S((B, N4, c), dt), S((B, T, K), jnp.int32), seg], 4),
        ("compressed_attention[hca]", hca, [qa, kva, sa, S((B, N128, c), dt), seg, S((B, N128), jnp.int32)], 4),
        ("compressed_attention[dense csa]", csa, [qa, kva, sa, S((B, N4, c), dt)], 4),
        ("compressed_attention[window]", win, [qa, kva, sa], 3),
        ("indexer_scores", idx, [S((B, T, n_idx_heads, idx_dim), dt), S((B, N4, idx_dim), dt),
                                 S((B, T, n_idx_heads), jnp.float32), seg, S((B, N4), jnp.int32)], 3),
    ]
    out = []
    for name, f, avals, n in cases:
        out.append((name + " fwd", f, avals))
        out.append((name + " bwd", grad_of(f, n), avals))
    return out


def lower(fn, avals, platform):
    """Lower for "tpu" or "cuda"; returns the StableHLO text."""
    import jax

    if platform == "cuda":
        with jax.sharding.use_abstract_mesh(abstract_gpu_mesh()):
            return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    return jax.jit(fn).trace(*avals).lower(lowering_platforms=(platform,)).as_text()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libtpu", required=True, help="folder holding libtpu/libtpu.so (an unpacked libtpu wheel)")
    ap.add_argument("--topology", default="v5e:2x2", help="e.g. v5e:2x2, v6e:2x2, v5p:2x2x1, v4:2x2x1")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    so = os.path.join(args.libtpu, "libtpu", "libtpu.so")
    if not os.path.exists(so):
        so = os.path.join(args.libtpu, "libtpu.so")
    os.environ.update(TPU_LIBRARY_PATH=so, TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    import jax
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    sharding = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), PartitionSpec())
    failed = 0
    for name, fn, avals in kernel_cases(T=args.seq, H=args.heads, c=args.head_dim, K=args.topk, dtype=args.dtype):
        avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in avals]
        try:
            jax.jit(fn).trace(*avals).lower().compile()
            print(f"{args.topology} {name}: compiled")
        except Exception as e:  # noqa: BLE001 - report every kernel
            failed += 1
            print(f"{args.topology} {name}: FAILED {str(e)[:2000]}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
