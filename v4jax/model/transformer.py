"""The whole DeepSeek-V4 model (spec 7): ``ids [B, T] -> logits [B, T, vocab]``.

``X0 = repeat_n(Emb(ids))``; each layer is a ``Block``; ``logits = head(norm(hc_head(X_L)))``.
With ``n_mtp_layers = 1`` the MTP block runs on ``X_L`` and the next tokens and returns
``mtp_logits`` (position t predicts token t+2; the last position has no next token and is padded,
its prediction must be masked by the loss).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from v4jax.config import V4Config
from v4jax.hyper_connection import HCHead
from v4jax.layers.linear import Linear
from v4jax.layers.norms import RMSNorm
from v4jax.model.block import Block
from v4jax.model.mtp import MTPBlock


class Transformer(nn.Module):
    """Variables: ``params`` (all trainable weights) and ``buffers`` (router biases, hash tables).

    ``__call__(ids, with_mtp=None)`` returns a dict: ``logits [B,T,V]`` (fp32), ``mtp_logits``
    (when the MTP block runs), ``moe`` (per-layer router statistics), ``hidden`` (final streams).
    """

    cfg: V4Config

    def setup(self):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nn.Embed(cfg.vocab_size, cfg.dim, param_dtype=pdt, dtype=dt,
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                          ("vocab", "embed")))
        self.layers = [Block(cfg, cfg.layer_types[i], cfg.is_hash_layer(i), name=f"layers_{i}")
                       for i in range(cfg.n_layers)]
        self.hc_head = HCHead(cfg.hc())
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Linear(cfg.vocab_size, ("embed", "vocab"), dt, pdt)
        if cfg.n_mtp_layers:
            self.mtp = [MTPBlock(cfg, "window", False, name="mtp_0")]

    def logits(self, h: jnp.ndarray) -> jnp.ndarray:
        return self.head(h).astype(jnp.float32)

    def __call__(self, ids: jnp.ndarray, with_mtp: bool | None = None, cache: dict | None = None,
                 n_valid: jnp.ndarray | None = None, segment_ids: jnp.ndarray | None = None,
                 next_ids: jnp.ndarray | None = None, indexer_loss: bool = False,
                 dense_attention: jnp.ndarray | None = None):
        """With ``cache`` (``v4jax.inference.cache.init_cache``), ``ids`` is the next chunk of every
        sequence (positions ``cache["pos"][b] + t``; only the first ``n_valid[b]`` tokens are real,
        default all) and ``out["cache"]`` is the updated cache.

        Training (no cache): ``segment_ids [B, T]`` marks packed documents (attention and
        compression stay inside a document); ``next_ids [B, T]`` are the tokens at t+1 fed to the
        MTP block (default: ``ids`` shifted, last position padded); ``indexer_loss`` makes every
        CSA layer report its indexer KL in ``out["moe"][i]["indexer_kl"]`` (``indexer_count``);
        ``dense_attention`` (traced bool) switches CSA top-k off without recompiling."""
        cfg = self.cfg
        h = self.embed(ids)
        x = jnp.repeat(h[:, :, None, :], cfg.hc_mult, axis=2)
        stats = []
        new_layers = []
        if cache is not None and n_valid is None:
            n_valid = jnp.full(ids.shape[:1], ids.shape[1], jnp.int32)
        for i, layer in enumerate(self.layers):
            if cache is None:
                x, st = layer(x, ids, segment_ids=segment_ids, indexer_loss=indexer_loss,
                              dense_attention=dense_attention)
            else:
                x, st, lc = layer(x, ids, cache["layers"][i], cache["pos"], n_valid)
                new_layers.append(lc)
            stats.append(st)
        out = {"logits": self.logits(self.norm(self.hc_head(x))), "hidden": x, "moe": stats}
        if cache is not None:
            out["cache"] = {**cache, "pos": cache["pos"] + n_valid, "layers": new_layers}
            return out
        run_mtp = cfg.n_mtp_layers > 0 if with_mtp is None else (with_mtp and cfg.n_mtp_layers > 0)
        if cfg.n_mtp_layers and (run_mtp or self.is_initializing()):
            if next_ids is None:
                next_ids = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
            hm, mst = self.mtp[0].predict(x, self.embed(next_ids), next_ids, segment_ids)
            out["mtp_logits"] = self.logits(hm)
            out["mtp_moe"] = mst
        return out
