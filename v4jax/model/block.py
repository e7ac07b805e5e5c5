"""One decoder block (spec 4, official ``Block.forward``): hc_pre(attn) -> attn_norm -> Attention
-> hc_post, then hc_pre(ffn) -> ffn_norm -> MoE -> hc_post. Streams ``X [B, T, n, d]``."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from v4jax.attention.attention import Attention
from v4jax.config import V4Config
from v4jax.hyper_connection import HyperConnection, expand
from v4jax.layers.norms import RMSNorm
from v4jax.moe.moe import MoE


class Block(nn.Module):
    """Parameter names follow the official checkpoint: ``hc_attn``, ``attn_norm``, ``attn``,
    ``hc_ffn``, ``ffn_norm``, ``ffn``."""

    cfg: V4Config
    layer_type: str
    hash_routed: bool

    def setup(self):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.hc_attn = HyperConnection(cfg.hc())
        self.hc_ffn = HyperConnection(cfg.hc())
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.attention(self.layer_type), dt, pdt)
        self.ffn = MoE(cfg.moe(self.hash_routed), dt, pdt)

    def __call__(self, x: jnp.ndarray, token_ids: jnp.ndarray, cache: dict | None = None, start=None,
                 n_valid=None, segment_ids: jnp.ndarray | None = None, indexer_loss: bool = False,
                 dense_attention: jnp.ndarray | None = None):
        """-> (streams, router stats), plus the new layer cache when ``cache`` is given.

        Training: ``segment_ids [B, T]`` packed documents; ``indexer_loss`` adds the layer's
        ``indexer_kl`` / ``indexer_count`` to the stats (CSA layers, see ``Attention``)."""
        u, post, comb = self.hc_attn(x)
        extra = {}
        if cache is None and (segment_ids is not None or indexer_loss or dense_attention is not None):
            a, aux = self.attn(self.attn_norm(u), segment_ids=segment_ids, indexer_loss=indexer_loss,
                               dense_attention=dense_attention, return_indexer=True)
            extra = {k: aux[k] for k in ("indexer_kl", "indexer_count") if k in aux}
        elif cache is None:
            a = self.attn(self.attn_norm(u))
        else:
            a, cache = self.attn(self.attn_norm(u), cache=cache, start=start, n_valid=n_valid)
        x = expand(x, a, post, comb)
        u, post, comb = self.hc_ffn(x)
        y, stats = self.ffn(self.ffn_norm(u), token_ids)
        stats = {**stats, **extra}
        x = expand(x, y, post, comb)
        return (x, stats) if cache is None else (x, stats, cache)
