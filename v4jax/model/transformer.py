"""The whole DeepSeek-V4 model (spec 7): ``ids [B, T] -> logits [B, T, vocab]``.

``X0 = repeat_n(Emb(ids))``; the layers run as scanned stacks of repeating patterns
(``v4jax.model.layout``); ``logits = head(norm(hc_head(X_L)))``. With ``n_mtp_layers = 1`` the MTP
block runs on ``X_L`` and the next tokens and returns ``mtp_logits`` (position t predicts token
t+2; the last position has no next token and is padded, its prediction must be masked by the loss).

Entry points: ``__call__(ids, ctx, with_mtp, next_ids)`` for a whole sequence and
``extend(ids, cache, n_valid)`` for a cached chunk; ``init_cache`` builds the cache beside them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.attention.context import IndexerStats, SeqContext
from v4jax.config import V4Config
from v4jax.hyper_connection import HCHead
from v4jax.layers.linear import Linear
from v4jax.layers.norms import RMSNorm
from v4jax.model.block import Repeat, init_block_cache
from v4jax.model.layout import STACK_AXIS, layer_plan
from v4jax.model.mtp import MTPBlock
from v4jax.runtime import Runtime, remat_policy

_SCANNED = {"params": 0, "buffers": 0, "intermediates": 0}


def _check_length(ids: jnp.ndarray, cfg: V4Config, what: str) -> None:
    """``ids [B, T]`` with ``T <= cfg.max_seq_len``; T is static, so this raises at trace time."""
    if ids.ndim != 2:
        raise ValueError(f"token ids must have shape [batch, seq], got {tuple(ids.shape)}")
    if ids.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{what} length {ids.shape[1]} exceeds the model's max_seq_len {cfg.max_seq_len}")


class Transformer(nn.Module):
    """Variables: ``params`` (all trainable weights) and ``buffers`` (router biases, hash tables);
    the layers' under ``stack_{k}/layer_{j}`` with a leading repeats axis (``v4jax.model.layout``).

    ``__call__`` returns a dict: ``logits [B,T,V]`` (fp32), ``hidden`` (final streams), ``moe``
    (per-layer router statistics, a list in layer order), ``indexer`` (per-layer ``IndexerStats``,
    zero except on CSA layers with ``ctx.indexer_loss``), and when the MTP block runs
    ``mtp_logits`` and ``mtp_moe``.
    """

    cfg: V4Config
    runtime: Runtime = Runtime()

    def setup(self):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nn.Embed(cfg.vocab_size, cfg.dim, param_dtype=pdt, dtype=dt,
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                          ("vocab", "embed")))
        self.stacks = [Repeat(cfg, st.pattern, self.runtime, name=f"stack_{k}")
                       for k, st in enumerate(layer_plan(cfg))]
        self.hc_head = HCHead(cfg.hc())
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Linear(cfg.vocab_size, ("embed", "vocab"), dt, pdt)
        if cfg.n_mtp_layers:
            self.mtp = [MTPBlock(cfg, "window", False, self.runtime, name="mtp_0")]

    def logits(self, h: jnp.ndarray) -> jnp.ndarray:
        return self.head(h).astype(jnp.float32)

    def _scan(self, body, repeats: int):
        policy = remat_policy(self.runtime.remat)
        if policy is not None:
            body = nn.remat(body, policy=policy, prevent_cse=False)
        return nn.scan(body, variable_axes=_SCANNED, split_rngs={"params": True}, length=repeats,
                       unroll=self._unroll(repeats), metadata_params={nn.PARTITION_NAME: STACK_AXIS})

    def _unroll(self, repeats: int) -> int | bool:
        """Stacks of at most ``runtime.unroll`` repeats run fully unrolled, with no loop (the
        loop's per-iteration slicing and residual stacking cost more than they save on shallow
        stacks); deeper stacks are one loop iteration per repeat."""
        return True if repeats <= self.runtime.unroll else 1

    def __call__(self, ids: jnp.ndarray, ctx: SeqContext = SeqContext(), with_mtp: bool | None = None,
                 next_ids: jnp.ndarray | None = None) -> dict:
        """Whole sequences ``ids [B, T]``. ``ctx``: packed documents, dense-stage flag, indexer
        loss (``SeqContext``). ``next_ids [B, T]``: the tokens at t+1 fed to the MTP block
        (default: ``ids`` shifted, last position padded). ``T <= cfg.max_seq_len`` (checked when
        traced: T is static)."""
        cfg = self.cfg
        _check_length(ids, cfg, "sequence")
        x = jnp.repeat(self.embed(ids)[:, :, None, :], cfg.hc_mult, axis=2)
        stats: list = [None] * cfg.n_layers
        istats: list = [None] * cfg.n_layers
        for st, mod in zip(layer_plan(cfg), self.stacks):
            body = lambda m, carry, _: m(carry, ids, ctx)
            x, (s_all, i_all) = self._scan(body, st.repeats)(mod, x, None)
            for r in range(st.repeats):
                for j in range(len(st.pattern)):
                    i = st.layer_index(r, j)
                    stats[i] = jax.tree.map(lambda a: a[r], s_all[j])
                    istats[i] = jax.tree.map(lambda a: a[r], i_all[j])
        out = {"logits": self.logits(self.norm(self.hc_head(x))), "hidden": x, "moe": stats, "indexer": istats}
        run_mtp = cfg.n_mtp_layers > 0 if with_mtp is None else (with_mtp and cfg.n_mtp_layers > 0)
        if cfg.n_mtp_layers and (run_mtp or self.is_initializing()):
            if next_ids is None:
                next_ids = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
            hm, mst = self.mtp[0].predict(x, self.embed(next_ids), next_ids, ctx.segment_ids)
            out["mtp_logits"] = self.logits(hm)
            out["mtp_moe"] = mst
        return out

    def extend(self, ids: jnp.ndarray, cache: dict, n_valid: jnp.ndarray | None = None) -> dict:
        """The next chunk ``ids [B, T]`` of every sequence against ``cache`` (``init_cache``;
        positions ``cache["pos"][b] + t``; only the first ``n_valid[b]`` tokens are real, default
        all). Returns ``{"logits", "cache"}``."""
        cfg = self.cfg
        _check_length(ids, cfg, "chunk")
        if n_valid is None:
            n_valid = jnp.full(ids.shape[:1], ids.shape[1], jnp.int32)
        start = cache["pos"]
        x = jnp.repeat(self.embed(ids)[:, :, None, :], cfg.hc_mult, axis=2)
        new_layers = {}
        for k, (st, mod) in enumerate(zip(layer_plan(cfg), self.stacks)):
            body = lambda m, carry, c: m.extend(carry, ids, c, start, n_valid)
            scan = nn.scan(body, variable_axes=_SCANNED, split_rngs={"params": True}, length=st.repeats,
                           unroll=self._unroll(st.repeats))
            x, new_layers[f"stack_{k}"] = scan(mod, x, cache["layers"][f"stack_{k}"])
        logits = self.logits(self.norm(self.hc_head(x)))
        return {"logits": logits, "hidden": x, "cache": {**cache, "pos": start + n_valid, "layers": new_layers}}

    def mtp_extend(self, streams: jnp.ndarray, next_ids: jnp.ndarray, cache: dict,
                   n_valid: jnp.ndarray | None = None) -> dict:
        """The MTP block over a chunk: main final streams ``streams [B, T, n, d]`` (``extend``'s
        ``hidden``) at positions ``cache["pos"][b] + t`` and the tokens ``next_ids [B, T]`` at
        t+1 -> ``{"logits"`` (predicting t+2) ``, "cache"}`` against ``init_mtp_cache``'s cache."""
        if not self.cfg.n_mtp_layers:
            raise ValueError("this model has no MTP block (n_mtp_layers = 0)")
        _check_length(next_ids, self.cfg, "chunk")
        if n_valid is None:
            n_valid = jnp.full(next_ids.shape[:1], next_ids.shape[1], jnp.int32)
        start = cache["pos"]
        h, block = self.mtp[0].extend(streams, self.embed(next_ids), next_ids, cache["block"], start, n_valid)
        return {"logits": self.logits(h), "cache": {**cache, "pos": start + n_valid, "block": block}}

    def decode(self, tokens: jnp.ndarray, cache: dict) -> dict:
        """One new token per sequence: ``tokens [B]`` at positions ``cache["pos"]`` ->
        ``{"logits" [B, vocab], "cache"}``. The cached path for T = 1 with every row real: each
        layer reads its window ring and, for CSA, only the indexer's selected entries, and writes
        one ring slot and the compressor's pending row in place (when the caller donates the cache,
        as ``V4Model.decode_step`` does)."""
        out = self.extend(tokens[:, None], cache, jnp.ones(tokens.shape[:1], jnp.int32))
        return {"logits": out["logits"][:, 0], "cache": out["cache"]}


def init_cache(cfg: V4Config, batch: int, max_len: int, dtype=jnp.float32, fmt: str = "native") -> dict:
    """An empty fixed-shape cache for ``batch`` sequences of up to ``max_len`` tokens (spec 3.8):
    ``pos [B]`` (tokens seen per sequence), ``max_len``, and ``layers``: per stack
    ``{"layer_{j}": block cache with a leading repeats axis}``, stacked like the parameters
    (``layout.layer_tree(cfg, cache["layers"], i)`` gives layer i's). ``fmt``: ``"native"``
    (``dtype``) or ``"fp8"`` (``v4jax.attention.kv_format``)."""
    if max_len < 1 or max_len > cfg.max_seq_len:
        raise ValueError(f"max_len must be in [1, {cfg.max_seq_len}], got {max_len}")
    if fmt not in ("native", "fp8"):
        raise ValueError(f"cache format must be 'native' or 'fp8', got {fmt!r}")
    layers = {}
    for k, st in enumerate(layer_plan(cfg)):
        group = {}
        for j, (lt, _) in enumerate(st.pattern):
            one = init_block_cache(cfg, lt, batch, max_len, dtype, fmt)
            group[f"layer_{j}"] = jax.tree.map(lambda a: jnp.broadcast_to(a, (st.repeats,) + a.shape), one)
        layers[f"stack_{k}"] = group
    return {"pos": jnp.zeros((batch,), jnp.int32), "max_len": jnp.asarray(max_len, jnp.int32), "layers": layers}


def init_mtp_cache(cfg: V4Config, batch: int, max_len: int, dtype=jnp.float32, fmt: str = "native") -> dict:
    """The MTP block's cache for ``Transformer.mtp_extend``: ``pos [B]``, ``max_len`` and its
    window-attention ``block`` cache (the MTP block has no compressor)."""
    if not cfg.n_mtp_layers:
        raise ValueError("this model has no MTP block (n_mtp_layers = 0)")
    return {"pos": jnp.zeros((batch,), jnp.int32), "max_len": jnp.asarray(max_len, jnp.int32),
            "block": init_block_cache(cfg, "window", batch, max_len, dtype, fmt)}


__all__ = ["Transformer", "init_cache", "init_mtp_cache", "IndexerStats", "SeqContext"]
