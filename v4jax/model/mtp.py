"""Multi-token prediction block, depth 1 (spec 6; official ``MTPBlock``).

For position t it predicts token t+2 from the main model's final streams ``H_t`` (before its HC
head) and the embedding of token t+1: ``X_a = e_proj(enorm(Emb(x_{t+1}))) + h_proj(hnorm(H_{t,a}))``,
then one window-attention block with learned routing, its own HC head and ``norm``, and the
main model's (shared) ``head``.
"""

from __future__ import annotations

import jax.numpy as jnp

from v4jax.attention.context import SeqContext
from v4jax.hyper_connection import HCHead
from v4jax.layers.linear import Linear
from v4jax.layers.quantized import qat_format
from v4jax.layers.norms import RMSNorm
from v4jax.model.block import Block


class MTPBlock(Block):
    """A ``Block`` (layer type "window", learned routing) plus ``e_proj``, ``h_proj``, ``enorm``,
    ``hnorm``, ``norm`` and ``hc_head``; all under one ``mtp_0`` scope like the official ``mtp.0``."""

    def setup(self):
        super().setup()
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        fq = qat_format(cfg.qat, "fp8")
        self.e_proj = Linear(cfg.dim, ("embed", "embed_out"), dt, pdt, fake_quant=fq)
        self.h_proj = Linear(cfg.dim, ("embed", "embed_out"), dt, pdt, fake_quant=fq)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hc_head = HCHead(cfg.hc())

    def _inputs(self, streams: jnp.ndarray, next_emb: jnp.ndarray) -> jnp.ndarray:
        """``X_a = e_proj(enorm(Emb(x_{t+1}))) + h_proj(hnorm(H_{t,a}))`` ``[B, T, n, d]``."""
        e = self.e_proj(self.enorm(next_emb))
        return (e[:, :, None, :] + self.h_proj(self.hnorm(streams))).astype(streams.dtype)

    def extend(self, streams: jnp.ndarray, next_emb: jnp.ndarray, next_ids: jnp.ndarray, cache: dict, start,
               n_valid):
        """The cached form of ``predict`` for a chunk of positions ``start[b] + t`` (the MTP block's
        own window cache, ``init_block_cache(cfg, "window", ...)``) -> (normed hidden ``[B, T, d]``,
        new cache); the draft model of self-speculative decoding."""
        x, cache = Block.extend(self, self._inputs(streams, next_emb), next_ids, cache, start, n_valid)
        return self.norm(self.hc_head(x)), cache

    def predict(self, streams: jnp.ndarray, next_emb: jnp.ndarray, next_ids: jnp.ndarray,
                segment_ids: jnp.ndarray | None = None):
        """streams ``[B, T, n, d]``, next_emb ``[B, T, d]`` -> (normed hidden ``[B, T, d]``, stats).
        ``segment_ids [B, T]``: the packed documents of the main positions."""
        x, stats, _ = Block.__call__(self, self._inputs(streams, next_emb), next_ids, SeqContext(segment_ids=segment_ids))
        return self.norm(self.hc_head(x)), stats
