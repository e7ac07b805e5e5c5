"""KV-cache memory accounting (spec 3.8), computed from the real cache pytree with
``jax.eval_shape`` (nothing is allocated), next to the V3.2-MLA and GQA baselines.

The CLI, ``v4jax-cache-report`` (``v4jax.inference.cache_report_cli``), prints these rows; with
``--weights`` / ``--slice`` / ``--mesh`` it also prints the serving memory per device
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

from v4jax.config import V4Config
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
