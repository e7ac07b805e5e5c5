"""Routed experts as stacked weights ``w1, w3 [E, d, I]``, ``w2 [E, I, d]`` with the clamped
SwiGLU of spec 5: ``g = min(x W1, L)``, ``v = clip(x W3, -L, L)``, ``y = (w * silu(g) * v) W2``.

``experts_ragged`` is the dropless sort + ``jax.lax.ragged_dot`` dispatch (one grouped matmul per
projection); ``experts_dense`` evaluates every expert on every token and is its test oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.layers.linear import silu


def swiglu(g: jnp.ndarray, v: jnp.ndarray, limit: float) -> jnp.ndarray:
    g = jnp.minimum(g, limit)
    v = jnp.clip(v, -limit, limit)
    return silu(g) * v


def experts_ragged(x, idx, weights, w1, w2, w3, limit, dtype=jnp.float32):
    """x ``[N, d]``, idx/weights ``[N, K]`` -> ``[N, d]`` (fp32)."""
    N, K = idx.shape
    E = w1.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // K
    xs = jnp.take(x, token, axis=0).astype(dtype)
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    mm = lambda a, w: jax.lax.ragged_dot(a, w.astype(dtype), sizes).astype(jnp.float32)
    h = swiglu(mm(xs, w1), mm(xs, w3), limit)
    h = h * jnp.take(weights.reshape(-1), order)[:, None].astype(jnp.float32)
    ys = mm(h.astype(dtype), w2)
    return jnp.zeros((N, x.shape[-1]), jnp.float32).at[token].add(ys)


def experts_dense(x, idx, weights, w1, w2, w3, limit):
    """Oracle: every expert on every token, combined with the routing weights. fp32."""
    E = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * weights[..., None], axis=-2)  # [N,E]
    xf = x.astype(jnp.float32)
    h = swiglu(jnp.einsum("nd,edi->eni", xf, w1), jnp.einsum("nd,edi->eni", xf, w3), limit)
    y = jnp.einsum("eni,eid->end", h, w2.astype(jnp.float32))
    return jnp.einsum("end,ne->nd", y, combine)
