"""KV-cache memory accounting (spec 3.8), computed from the real cache pytree with
``jax.eval_shape`` (nothing is allocated), next to the V3.2-MLA and GQA baselines.

With ``--weights`` / ``--slice`` / ``--mesh`` the CLI also prints the serving memory per device
(``v4jax.parallel.plan.inference_memory``): the resident weights, native as the released
checkpoint stores them (FP8 / FP4 with their scales) and dequantized to bf16, next to the decode
cache of ``--batch`` sequences of ``--context`` tokens split over the mesh's batch axes, and
whether that fits the slice's HBM::

    v4jax-cache-report --preset flash --weights native --slice 8xH100 --context 1048576
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from v4jax.config import V4Config, preset
from v4jax.model.transformer import init_cache

V32_MLA_BYTES_PER_LAYER = 656 + 132   # MLA latent + indexer key per token per layer (spec 3.8)
V32_LAYERS = 61


def cache_bytes(cfg: V4Config, max_len: int, batch: int = 1, dtype=jnp.bfloat16, fmt: str = "native") -> int:
    """Bytes of the cache pytree for ``batch`` sequences of ``max_len`` tokens."""
    tree = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype, fmt))
    nbytes = lambda x: x.size // 2 if x.dtype == jnp.float4_e2m1fn else x.size * x.dtype.itemsize  # FP4 packed
    return sum(nbytes(x) for x in jax.tree.leaves(tree))


@dataclass(frozen=True)
class CacheReport:
    name: str
    context: int
    per_token: float          # bytes per token at long context (growth rate of the cache), one sequence
    constant: int             # bytes that do not grow with context (window rings, compressor state), one sequence
    total: int                # bytes for `batch` sequences at `context` tokens
    v32_total: int            # V3.2 MLA baseline (61 layers x 788 B per token), `batch` sequences
    gqa8_total: int           # bf16 GQA, 8 KV heads of dim 128, same layer count as cfg, `batch` sequences
    batch: int = 1

    def row(self) -> str:
        gib = lambda b: b / 2 ** 30
        return (f"| {self.name} | {self.per_token:,.1f} | {gib(self.total):.2f} | {gib(self.v32_total):.2f} | "
                f"{100 * self.total / self.v32_total:.1f}% | {gib(self.gqa8_total):.1f} | "
                f"{100 * self.total / self.gqa8_total:.1f}% |")


def cache_report(cfg: V4Config, context: int = 2 ** 20, dtype=jnp.bfloat16, fmt: str = "native",
                 batch: int = 1) -> CacheReport:
    """Cache size of ``batch`` sequences (default one) at ``context`` tokens, from the pytree, and
    the baselines for as many sequences (``per_token`` and ``constant``: one sequence's)."""
    lcm = 4 * cfg.hca_ratio
    big, small = context - context % lcm, lcm
    size = lambda n: cache_bytes(cfg, n, 1, dtype, fmt)
    per_token = (size(big) - size(small)) / (big - small)
    one = size(context)
    constant = int(round(one - per_token * context))
    total = one if batch == 1 else cache_bytes(cfg, context, batch, dtype, fmt)
    v32 = V32_MLA_BYTES_PER_LAYER * V32_LAYERS * context * batch
    gqa = 2 * 8 * 128 * 2 * cfg.n_layers * context * batch
    name = cfg.name if fmt == "native" else f"{cfg.name} ({fmt})"
    if batch != 1:
        name += f" x {batch}"
    return CacheReport(name, context, per_token, constant, total, v32, gqa, batch)


HEADER = ("| model | bytes/token | cache at 1M tokens (GiB) | V3.2 MLA (GiB) | ratio | bf16 GQA-8 (GiB) | ratio |\n"
          "|---|---|---|---|---|---|---|")


def main(argv=None):
    """``v4jax-cache-report [--context N] [--batch B] [--preset P ...] [--dtype bfloat16|float32]
    [--format native fp8] [--weights native|bf16] [--slice S] [--mesh AXIS=N,...]``."""
    import argparse

    from v4jax.config import ConfigError
    from v4jax.parallel.mesh import parse_mesh
    from v4jax.parallel.plan import SLICES, WEIGHT_MODES, format_inference, inference_memory

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
