"""``v4jax-cache-report``: the decode cache's bytes per token and at a context (``v4jax.inference.memory``),
and with ``--weights`` / ``--slice`` the serving memory per device (``v4jax.parallel.plan.inference_memory``).
A CLI module: above the planner in the import graph."""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from v4jax.config import ConfigError, preset
from v4jax.inference.memory import HEADER, cache_report
from v4jax.parallel.mesh import parse_mesh
from v4jax.parallel.plan import SLICES, WEIGHT_MODES, format_inference, inference_memory


def main(argv=None):
    """``v4jax-cache-report [--context N] [--batch B] [--preset P ...] [--dtype bfloat16|float32]
    [--format native fp8] [--weights native|bf16] [--slice S] [--mesh AXIS=N,...]``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2 ** 20)
    ap.add_argument("--batch", type=int, default=None,
                    help="sequences in the cache (table: default 1; serving rows: one per batch shard of the mesh)")
    ap.add_argument("--preset", nargs="*", default=["flash", "pro"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--format", nargs="*", default=["native", "fp8"],
                    help="cache storage formats (the serving rows use the first)")
    ap.add_argument("--weights", default=None, choices=WEIGHT_MODES,
                    help="also print the serving memory per device; the verdict is for these weights "
                         "(native: as the checkpoint stores them; bf16: dequantized); both columns are printed")
    ap.add_argument("--slice", default=None, choices=tuple(SLICES), help="named slice for the serving rows")
    ap.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                    help="serving mesh (default with --slice: expert=<devices>; else one device)")
    ap.add_argument("--hbm-gib", type=float, default=None, help="HBM per device without --slice")
    a = ap.parse_args(argv)
    if a.batch is not None and a.batch < 1:
        ap.error(f"--batch {a.batch}: must be >= 1")
    print(HEADER.replace("1M", f"{a.context:,}"))
    for fmt in a.format:
        for name in a.preset:
            print(cache_report(preset(name), a.context, jnp.dtype(a.dtype), fmt, a.batch or 1).row())
    if a.weights is None and a.slice is None and a.mesh is None:
        return 0
    axes = None
    if a.mesh is not None:
        try:
            axes = parse_mesh(a.mesh)
        except ConfigError as e:
            ap.error(f"--mesh {a.mesh!r}: {e}")
    hbm = None if a.hbm_gib is None else a.hbm_gib * 2 ** 30
    for name in a.preset:
        cfg = preset(name)
        if not 1 <= a.context <= cfg.max_seq_len:
            ap.error(f"--context {a.context}: must be in [1, {cfg.max_seq_len}] for the serving rows")
        try:
            r = inference_memory(cfg, axes, weights=a.weights or "native", cache_len=a.context, cache_batch=a.batch,
                                 cache_format=(a.format or ["native"])[0], cache_dtype=a.dtype, slice=a.slice,
                                 hbm_bytes=hbm)
        except ValueError as e:
            ap.error(str(e))
        print()
        print(format_inference(r, title="serving memory"))
    return 0


if __name__ == "__main__":
    main()
