"""One decoder block (spec 4, official ``Block.forward``): hc_pre(attn) -> attn_norm -> Attention
-> hc_post, then hc_pre(ffn) -> ffn_norm -> MoE -> hc_post. Streams ``X [B, T, n, d]``.

``Block.__call__(x, token_ids, ctx)`` -> ``(streams, router stats, IndexerStats)`` (whole sequence);
``Block.extend(x, token_ids, cache, start, n_valid)`` -> ``(streams, new layer cache)``.
``Repeat`` is one repeat of a scanned stack's pattern (``v4jax.model.layout``): the blocks of the
pattern in order, with the same two entry points.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from v4jax.attention.attention import Attention, init_attention_cache
from v4jax.attention.context import IndexerStats, SeqContext
from v4jax.config import V4Config
from v4jax.hyper_connection import HyperConnection, expand
from v4jax.layers.norms import RMSNorm
from v4jax.moe.moe import MoE
from v4jax.runtime import Runtime
from v4jax.sharding import STREAM_AXES, constrain


class Block(nn.Module):
    """Parameter names follow the official checkpoint: ``hc_attn``, ``attn_norm``, ``attn``,
    ``hc_ffn``, ``ffn_norm``, ``ffn``."""

    cfg: V4Config
    layer_type: str
    hash_routed: bool
    runtime: Runtime = Runtime()

    def setup(self):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.hc_attn = HyperConnection(cfg.hc())
        self.hc_ffn = HyperConnection(cfg.hc())
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.attention(self.layer_type), dt, pdt, self.runtime)
        self.ffn = MoE(cfg.moe(self.hash_routed), dt, pdt, self.runtime.moe, self.runtime.ep_capacity)

    def _ffn(self, x, token_ids):
        u, post, comb = self.hc_ffn(x)
        y, stats = self.ffn(self.ffn_norm(u), token_ids)
        return expand(x, y, post, comb), stats

    def __call__(self, x: jnp.ndarray, token_ids: jnp.ndarray, ctx: SeqContext = SeqContext()):
        x = constrain(x, STREAM_AXES)        # layer boundary: streams split over the batch axes
        u, post, comb = self.hc_attn(x)
        a, istats = self.attn(self.attn_norm(u), ctx)
        x, stats = self._ffn(expand(x, a, post, comb), token_ids)
        return constrain(x, STREAM_AXES), stats, istats

    def extend(self, x: jnp.ndarray, token_ids: jnp.ndarray, cache: dict, start, n_valid):
        x = constrain(x, STREAM_AXES)
        u, post, comb = self.hc_attn(x)
        a, cache = self.attn.extend(self.attn_norm(u), cache, start, n_valid)
        x, _ = self._ffn(expand(x, a, post, comb), token_ids)
        return x, cache


def init_block_cache(cfg: V4Config, layer_type: str, batch: int, max_len: int, dtype, fmt: str = "native") -> dict:
    """A block's cache is its attention layer's (``init_attention_cache``)."""
    return init_attention_cache(cfg.attention(layer_type), batch, max_len, dtype, fmt)


class Repeat(nn.Module):
    """One repeat of a stack's pattern ``((layer_type, hash_routed), ...)``: blocks ``layer_{j}``."""

    cfg: V4Config
    pattern: tuple
    runtime: Runtime = Runtime()

    def setup(self):
        self.blocks = [Block(self.cfg, t, h, self.runtime, name=f"layer_{j}") for j, (t, h) in enumerate(self.pattern)]

    def __call__(self, x, token_ids, ctx: SeqContext):
        """-> (streams, (router stats per block), (IndexerStats per block))."""
        stats, istats = [], []
        for blk in self.blocks:
            x, st, ist = blk(x, token_ids, ctx)
            stats.append(st)
            istats.append(ist)
        return x, (tuple(stats), tuple(istats))

    def extend(self, x, token_ids, caches: dict, start, n_valid):
        """caches ``{"layer_{j}": cache}`` -> (streams, new caches)."""
        new = {}
        for j, blk in enumerate(self.blocks):
            x, new[f"layer_{j}"] = blk.extend(x, token_ids, caches[f"layer_{j}"], start, n_valid)
        return x, new


__all__ = ["Block", "Repeat", "IndexerStats", "init_block_cache"]
