"""mHC: manifold-constrained hyper-connections (spec 4; techniques 1.3).

The residual state is ``X [B, T, n, d]`` (n = hc_mult streams). Each sub-block (attention, MoE)
has ``fn [(2+n)n, n*d]``, ``base [(2+n)n]``, ``scale [3]``; rows are ``[pre (n) | post (n) |
res (n*n, row-major)]``. Coefficients come from the flattened, unweighted-RMS-normalised streams,
all in fp32:

* ``pre = sigmoid(a_pre * mu_pre + S_pre) + eps``    (collapses the streams into the block input)
* ``post = 2 * sigmoid(a_post * mu_post + S_post)``  (spreads the block output over the streams)
* ``comb = Sinkhorn(a_res * mu_res + S_res)``        (doubly stochastic residual mix)

and ``X'[b] = post[b] * F(u) + sum_a comb[a, b] * X[a]`` (the transposed mix: direction matters).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.config import HCSpec
from v4jax.layers.linear import param_with_axes
from v4jax.layers.norms import rms_factor


def _sinkhorn_axes(iters: int) -> tuple[int, ...]:
    """The normalised axis of each step on ``[n(row), n(col), N]``: columns (0) after the row
    softmax, then (rows 1, columns 0) ``iters - 1`` times."""
    return (0,) + (1, 0) * (iters - 1)


def _sinkhorn_steps(q: jnp.ndarray, iters: int, eps: float):
    """q ``[n, n, N]`` fp32 logits -> (row softmax, each step's output, each step's divisor)."""
    sm = jax.nn.softmax(q, axis=1)
    p, outs, divs = sm + eps, [], []
    for ax in _sinkhorn_axes(iters):
        d = jnp.sum(p, axis=ax, keepdims=True) + eps
        p = p / d
        outs.append(p)
        divs.append(d)
    return sm, outs, divs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sinkhorn_nnN(q: jnp.ndarray, iters: int, eps: float) -> jnp.ndarray:
    return _sinkhorn_steps(q, iters, eps)[1][-1]


def _sinkhorn_fwd(q, iters, eps):
    return _sinkhorn_nnN(q, iters, eps), q


def _sinkhorn_bwd(iters, eps, q, g):
    # each step p' = p / d with d = sum_axis(p) + eps has the VJP g -> (g - sum_axis(g * p')) / d;
    # the steps are recomputed from q (the forward is one fused loop; saving them would cost more)
    sm, outs, divs = _sinkhorn_steps(q, iters, eps)
    for ax, p, d in zip(reversed(_sinkhorn_axes(iters)), reversed(outs), reversed(divs)):
        g = (g - jnp.sum(g * p, axis=ax, keepdims=True)) / d
    return (sm * (g - jnp.sum(g * sm, axis=1, keepdims=True)),)


_sinkhorn_nnN.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def sinkhorn(logits: jnp.ndarray, iters: int, eps: float) -> jnp.ndarray:
    """DeepSeek's Sinkhorn-Knopp order: row softmax + eps, a column normalisation, then
    ``iters - 1`` rounds of (row, column) normalisation. The last step normalises columns, so the
    column sums (axis -2) are 1. ``[..., n, n]`` fp32 -> ``[..., n, n]``.

    Computed with the n x n axes leading (``[n, n, tokens]``): the row and column sums are then
    adds of contiguous vectors, which XLA:CPU runs ~5x faster forward and ~2x backward than
    reductions over two trailing axes of size 4 (experiments/results/profile). The steps are
    unrolled (a loop would launch each of the 19 rounds as its own thunks) and the gradient is
    hand-written (``_sinkhorn_bwd``, tested against autodiff of the plain loop): autodiff of the
    unrolled chain compiles to 178 instructions on XLA:CPU, this to 112 (1.2-2x faster)."""
    shape, n = logits.shape, logits.shape[-1]
    q = jnp.moveaxis(logits.astype(jnp.float32).reshape(-1, n, n), 0, -1)   # [n(row), n(col), N]
    return jnp.moveaxis(_sinkhorn_nnN(q, int(iters), float(eps)), -1, 0).reshape(shape)


def normalized_mix(x: jnp.ndarray, fn: jnp.ndarray, eps: float) -> jnp.ndarray:
    """``rms_normalize(x) @ fn.T`` for x ``[..., k]``, fn ``[m, k]`` -> ``[..., m]`` fp32, with the
    norm's per-row factor applied after the projection (a row scalar commutes with it): no
    normalised ``[..., k]`` copy is written, 2.5x faster forward on the tiny shapes."""
    xf = x.astype(jnp.float32)
    return jnp.einsum("...k,mk->...m", xf, fn.astype(jnp.float32)) * rms_factor(xf, eps)


def hc_coefficients(x: jnp.ndarray, fn: jnp.ndarray, base: jnp.ndarray, scale: jnp.ndarray,
                    spec: HCSpec):
    """x ``[B, T, n, d]`` -> (pre ``[B,T,n]``, post ``[B,T,n]``, comb ``[B,T,n,n]``), fp32."""
    n = spec.n_streams
    mix = normalized_mix(x.reshape(*x.shape[:-2], n * x.shape[-1]), fn, spec.norm_eps)
    base = base.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + spec.eps
    post = 2.0 * jax.nn.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    res = mix[..., 2 * n:] * scale[2] + base[2 * n:]
    comb = sinkhorn(res.reshape(*res.shape[:-1], n, n), spec.sinkhorn_iters, spec.eps)
    return pre, post, comb


def collapse(x: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """``sum_a w[a] * X[a]`` accumulated in fp32, cast to x's dtype. ``[B,T,n,d], [B,T,n] -> [B,T,d]``."""
    return jnp.einsum("btn,btnd->btd", weights, x.astype(jnp.float32)).astype(x.dtype)


def _mix(x: jnp.ndarray, comb: jnp.ndarray) -> jnp.ndarray:
    """``out[..., b, :] = sum_a comb[..., a, b] * x[..., a, :]`` as n broadcast multiply-adds."""
    return sum(comb[..., a, :, None] * x[..., a, None, :] for a in range(x.shape[-2]))


@jax.custom_vjp
def stream_mix(x: jnp.ndarray, comb: jnp.ndarray) -> jnp.ndarray:
    """The residual mix ``sum_a comb[a, b] X[a]``: x ``[..., n, d]``, comb ``[..., n, n]`` (fp32).

    Hand-written VJP (``dx = mix(g, comb^T)``, ``dcomb[a, b] = <x[a], g[b]>``) because the einsum
    form is a dot_general with [B, T] batch dims and a contraction of 4 (thousands of tiny matmuls
    on XLA:CPU) and autodiff of the elementwise form reduces badly: this is 7x faster forward and
    1.7x backward on the tiny shapes (experiments/results/profile)."""
    return _mix(x, comb)


def _stream_mix_fwd(x, comb):
    return _mix(x, comb), (x, comb)


def _stream_mix_bwd(res, g):
    x, comb = res
    return _mix(g, jnp.swapaxes(comb, -1, -2)), jnp.sum(x[..., :, None, :] * g[..., None, :, :], axis=-1)


stream_mix.defvjp(_stream_mix_fwd, _stream_mix_bwd)


def expand(x: jnp.ndarray, y: jnp.ndarray, post: jnp.ndarray, comb: jnp.ndarray) -> jnp.ndarray:
    """``X'[b] = post[b] * y + sum_a comb[a, b] X[a]``. x ``[B,T,n,d]``, y ``[B,T,d]``."""
    mixed = stream_mix(x.astype(jnp.float32), comb.astype(jnp.float32))   # [B, T, n, d]
    return (post[..., None] * y.astype(jnp.float32)[:, :, None, :] + mixed).astype(x.dtype)


class HyperConnection(nn.Module):
    """One mHC site. ``__call__(X) -> (u, post, comb)`` with ``u`` the collapsed block input."""

    spec: HCSpec

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        n, d = self.spec.n_streams, self.spec.dim
        m = (2 + n) * n
        fn = param_with_axes(self, "fn", nn.initializers.normal(0.02), (m, n * d), ("hc", "hc_embed"))
        base = param_with_axes(self, "base", nn.initializers.zeros, (m,), ("hc",))
        scale = param_with_axes(self, "scale", nn.initializers.constant(0.01), (3,), (None,))
        pre, post, comb = hc_coefficients(x, fn, base, scale, self.spec)
        return collapse(x, pre), post, comb


class HCHead(nn.Module):
    """Final stream collapse: ``a = sigmoid(scale * mu + base) + eps``, ``y = sum_a a X_a``.
    Parameters ``fn [n, n*d]``, ``base [n]``, ``scale [1]`` (official ``hc_head_fn/base/scale``)."""

    spec: HCSpec

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n, d = self.spec.n_streams, self.spec.dim
        fn = param_with_axes(self, "fn", nn.initializers.normal(0.02), (n, n * d), ("hc", "hc_embed"))
        base = param_with_axes(self, "base", nn.initializers.zeros, (n,), ("hc",))
        scale = param_with_axes(self, "scale", nn.initializers.constant(0.01), (1,), (None,))
        mix = normalized_mix(x.reshape(*x.shape[:-2], n * d), fn, self.spec.norm_eps)
        pre = jax.nn.sigmoid(mix * scale.astype(jnp.float32)[0] + base.astype(jnp.float32)) + self.spec.eps
        return collapse(x, pre)
