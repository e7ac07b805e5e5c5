"""The MoE layer (spec 5): router (learned or hash), routed experts, shared expert(s).

Non-gradient state lives in the ``buffers`` collection: ``gate.bias [E]`` (aux-loss-free
balancing bias, learned layers) and ``gate.tid2eid [vocab, K]`` (hash layers).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from v4jax.config import MoESpec
from v4jax.layers.linear import Linear, default_init, param_with_axes, weight_param
from v4jax.layers.quantized import dequantize, is_quantized, qat_format
from v4jax.moe.expert_parallel import expert_shards, experts_expert_parallel
from v4jax.moe.experts import (
    MIN_GROUP_LOAD,
    experts_blocked,
    experts_dense,
    experts_grouped,
    experts_ragged,
    resolve_impl,
    swiglu,
)
from v4jax.moe.router import (
    affinity,
    gate_weights,
    hash_route,
    sequence_balance_stats,
    topk_route,
)
from v4jax.sharding import active_mesh


def default_tid2eid(vocab_size: int, n_experts: int, k: int, seed: int = 0) -> np.ndarray:
    """A fixed seeded table ``[vocab, k]`` of k DISTINCT experts per token id (spec 11). The real
    hash function is unpublished; released checkpoints ship their table, which replaces this."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((vocab_size, n_experts)), axis=1)[:, :k].astype(np.int32)


class Gate(nn.Module):
    """Router weight ``weight [E, d]`` stored as kernel ``[d, E]``; fp32 logits."""

    spec: MoESpec

    @nn.compact
    def __call__(self, x: jnp.ndarray, token_ids: jnp.ndarray):
        s = self.spec
        w = param_with_axes(self, "kernel", default_init, (s.dim, s.n_experts), ("embed", "experts"))
        scores = affinity(jnp.einsum("...d,de->...e", x.astype(jnp.float32), w.astype(jnp.float32)),
                          s.score_func)
        if s.hash_routed:
            table = self.variable("buffers", "tid2eid",
                                  lambda: jnp.asarray(default_tid2eid(s.vocab_size, s.n_experts, s.topk)))
            idx = hash_route(token_ids, table.value)
        else:
            bias = self.variable("buffers", "bias", lambda: jnp.zeros((s.n_experts,), jnp.float32))
            idx = topk_route(scores, bias.value, s.topk)
        return scores, idx, gate_weights(scores, idx, s.route_scale)


class SharedExpert(nn.Module):
    """Clamped SwiGLU MLP ``w1, w3 [d, I]``, ``w2 [I, d]`` (official names)."""

    spec: MoESpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = self.spec
        inter = s.inter_dim * s.n_shared
        fq = qat_format(s.qat, "fp8")     # the shared expert is FP8 in the checkpoint (spec 8)
        lin = lambda f, axes, name: Linear(f, axes, self.dtype, self.param_dtype, name=name, fake_quant=fq)
        h = swiglu(lin(inter, ("embed", "mlp"), "w1")(x).astype(jnp.float32),
                   lin(inter, ("embed", "mlp"), "w3")(x).astype(jnp.float32), s.swiglu_limit)
        return lin(s.dim, ("mlp", "embed"), "w2")(h.astype(self.dtype))


class Experts(nn.Module):
    """Stacked routed experts ``w1, w3 [E, d, I]``, ``w2 [E, I, d]``; each expert is its own matrix.
    ``impl`` (``Runtime.moe``): "auto", "grouped", "blocked", "ragged", "tokamax" or "dense" (``resolve_impl``).
    Under a mesh with an ``expert`` axis the experts run expert-parallel
    (``v4jax.moe.expert_parallel``; ``ep_capacity``: None = dropless).

    ``(x [N, d], idx [N, K], weights [N, K]) -> (y [N, d], pairs placed: int32 scalar)``."""

    spec: MoESpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    ep_capacity: float | None = None

    @nn.compact
    def __call__(self, x, idx, weights):
        s = self.spec
        E, I, d = s.n_experts, s.inter_dim, s.dim
        fq = qat_format(s.qat, "fp4")     # routed experts: FP4 in the checkpoint (spec 8)
        w1 = weight_param(self, "w1", default_init, (E, d, I), ("experts", "embed", "mlp"), self.param_dtype, fake_quant=fq)
        w3 = weight_param(self, "w3", default_init, (E, d, I), ("experts", "embed", "mlp"), self.param_dtype, fake_quant=fq)
        w2 = weight_param(self, "w2", default_init, (E, I, d), ("experts", "mlp", "embed"), self.param_dtype, fake_quant=fq)
        impl = resolve_impl(self.impl)
        mesh = active_mesh()
        if any(map(is_quantized, (w1, w2, w3))):
            # native weights: the blocked dispatch at decode sizes gathers the selected experts'
            # codes and scales and dequantizes only those; every other path dequantizes the
            # layer's experts inside the program (one layer at a time in the scanned stack)
            small = idx.size < MIN_GROUP_LOAD * E
            if expert_shards(mesh) <= 1 and (impl == "blocked" or (impl == "grouped" and small)):
                y = experts_blocked(x, idx, weights, w1, w2, w3, s.swiglu_limit, self.dtype)
                return y, jnp.asarray(idx.size, jnp.int32)
            w1, w2, w3 = (dequantize(w, self.param_dtype) for w in (w1, w2, w3))
        if expert_shards(mesh) > 1:
            return experts_expert_parallel(x, idx, weights, w1, w2, w3, s.swiglu_limit, self.dtype, impl, mesh,
                                           self.ep_capacity)
        all_pairs = jnp.asarray(idx.size, jnp.int32)         # one device: every dispatch is dropless
        if impl == "dense":   # the oracle: same values, E/K x the FLOPs
            y = experts_dense(x, idx, weights, w1.astype(self.dtype), w2.astype(self.dtype),
                              w3.astype(self.dtype), s.swiglu_limit).astype(self.dtype)
        elif impl == "blocked":
            y = experts_blocked(x, idx, weights, w1, w2, w3, s.swiglu_limit, self.dtype)
        elif impl == "grouped":
            y = experts_grouped(x, idx, weights, w1, w2, w3, s.swiglu_limit, self.dtype)
        else:
            y = experts_ragged(x, idx, weights, w1, w2, w3, s.swiglu_limit, self.dtype, impl)
        return y, all_pairs


class MoE(nn.Module):
    """x ``[B, T, d]``, token_ids ``[B, T]`` -> (y ``[B, T, d]``, stats ``{"balance", "load",
    "dropped"}``; ``dropped``: (token, expert) pairs the dispatch did not compute, 0 unless an
    expert-parallel capacity is set)."""

    spec: MoESpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    ep_capacity: float | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, token_ids: jnp.ndarray):
        s = self.spec
        B, T, d = x.shape
        scores, idx, weights = Gate(s, name="gate")(x, token_ids)
        E = s.n_experts
        routed, placed = Experts(s, self.dtype, self.param_dtype, self.impl, self.ep_capacity, name="experts")(
            x.reshape(B * T, d), idx.reshape(B * T, -1), weights.reshape(B * T, -1))
        y = routed.reshape(B, T, d)
        if s.n_shared > 0:
            y = y + SharedExpert(s, self.dtype, self.param_dtype, name="shared_experts")(x).astype(jnp.float32)
        f, p, load = sequence_balance_stats(scores, idx, E)
        stats = {"balance": jnp.mean(jnp.sum(f * p, axis=-1)), "load": load,
                 "dropped": jnp.asarray(idx.size, jnp.int32) - placed}
        return y.astype(self.dtype), stats
