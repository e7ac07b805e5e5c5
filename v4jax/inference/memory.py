"""KV-cache memory accounting (spec 3.8), computed from the real cache pytree with
``jax.eval_shape`` (nothing is allocated), next to the V3.2-MLA and GQA baselines."""

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
    per_token: float          # bytes per token at long context (growth rate of the cache)
    constant: int             # bytes that do not grow with context (window rings, compressor state)
    total: int                # bytes for one sequence at `context` tokens
    v32_total: int            # V3.2 MLA baseline (61 layers x 788 B per token)
    gqa8_total: int           # bf16 GQA, 8 KV heads of dim 128, same layer count as cfg

    def row(self) -> str:
        gib = lambda b: b / 2 ** 30
        return (f"| {self.name} | {self.per_token:,.1f} | {gib(self.total):.2f} | {gib(self.v32_total):.2f} | "
                f"{100 * self.total / self.v32_total:.1f}% | {gib(self.gqa8_total):.1f} | "
                f"{100 * self.total / self.gqa8_total:.1f}% |")


def cache_report(cfg: V4Config, context: int = 2 ** 20, dtype=jnp.bfloat16, fmt: str = "native") -> CacheReport:
    """Cache size of one sequence at ``context`` tokens, from the pytree, and the baselines."""
    lcm = 4 * cfg.hca_ratio
    big, small = context - context % lcm, lcm
    size = lambda n: cache_bytes(cfg, n, 1, dtype, fmt)
    per_token = (size(big) - size(small)) / (big - small)
    total = size(context)
    constant = int(round(total - per_token * context))
    v32 = V32_MLA_BYTES_PER_LAYER * V32_LAYERS * context
    gqa = 2 * 8 * 128 * 2 * cfg.n_layers * context
    name = cfg.name if fmt == "native" else f"{cfg.name} ({fmt})"
    return CacheReport(name, context, per_token, constant, total, v32, gqa)


HEADER = ("| model | bytes/token | cache at 1M tokens (GiB) | V3.2 MLA (GiB) | ratio | bf16 GQA-8 (GiB) | ratio |\n"
          "|---|---|---|---|---|---|---|")


def main(argv=None):
    """``v4jax-cache-report [--context N] [--preset P ...] [--dtype bfloat16|float32]``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=2 ** 20)
    ap.add_argument("--preset", nargs="*", default=["flash", "pro"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--format", nargs="*", default=["native", "fp8"], help="cache storage formats")
    a = ap.parse_args(argv)
    print(HEADER.replace("1M", f"{a.context:,}"))
    for fmt in a.format:
        for name in a.preset:
            print(cache_report(preset(name), a.context, jnp.dtype(a.dtype), fmt).row())


if __name__ == "__main__":
    main()
