"""Routed experts as stacked weights ``w1, w3 [E, d, I]``, ``w2 [E, I, d]`` with the clamped
SwiGLU of spec 5: ``g = min(x W1, L)``, ``v = clip(x W3, -L, L)``, ``y = (w * silu(g) * v) W2``.

Four dropless dispatches with the same values (tested against each other), chosen by
``Runtime.moe`` (``resolve_impl``):

* ``experts_grouped`` (CPU default): gathers TOKENS, not weights. The sorted pairs are laid out
  as ``[E, C, d]``, ``C`` rows per expert for a static capacity ``C`` a little above the balanced
  load (``GROUP_LEVELS``: 1.25x, 1.5x, 2x), and each projection is one batched matmul against the
  stacked expert weights themselves (w1|w3 fused into one ``[E, d, 2I]`` matmul): no weight gather
  forward, no scatter of weight gradients backward, and padding FLOPs bounded by the level. The
  level is picked at run time (``lax.switch``) from the largest expert's load; a routing that
  fits none of them (or a decode-sized batch) runs ``experts_blocked``, so it stays dropless.
* ``experts_blocked``: the (token, expert) pairs are sorted by expert and cut into
  fixed blocks of ``b`` rows that each belong to one expert; one batched matmul per projection
  over the blocks with each block's expert matrix gathered. Expert FLOPs are those of the
  selected experts plus at most ``b - 1`` padding rows per expert; with ``b = 1`` (decode) only
  the selected experts' weights are read. ``lax.ragged_dot`` lowers on XLA:CPU to a loop that is
  slower than computing every expert, hence this formulation.
* ``experts_ragged`` (GPU / TPU default): sort + one grouped matmul per projection,
  ``jax.lax.ragged_dot`` or ``tokamax.ragged_dot`` (optional extra, Pallas kernels on GPU/TPU).
* ``experts_dense``: every expert on every token, combined with the routing weights (E/K x the
  FLOPs); the test oracle.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from v4jax.layers.linear import silu
from v4jax.layers.quantized import dequantize
from v4jax.layers.quantized import take as qtake

MAX_BLOCK = 128


def swiglu(g: jnp.ndarray, v: jnp.ndarray, limit: float) -> jnp.ndarray:
    g = jnp.minimum(g, limit)
    v = jnp.clip(v, -limit, limit)
    return silu(g) * v


def tokamax_available() -> bool:
    try:
        import tokamax  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str) -> str:
    """``Runtime.moe`` -> the dispatch actually run. ``"auto"``: ``"grouped"`` on CPU,
    ``"tokamax"`` on GPU/TPU when tokamax is installed, else ``"ragged"`` (``lax.ragged_dot``)."""
    if impl != "auto":
        if impl == "tokamax" and not tokamax_available():
            raise ImportError("Runtime(moe='tokamax') needs the optional tokamax package: pip install 'v4jax[tokamax]'")
        return impl
    if jax.default_backend() == "cpu":
        return "grouped"
    return "tokamax" if tokamax_available() else "ragged"


def _ragged_dot(impl: str):
    if impl == "tokamax":
        import tokamax

        return tokamax.ragged_dot
    return jax.lax.ragged_dot


def experts_ragged(x, idx, weights, w1, w2, w3, limit, dtype=jnp.float32, impl: str = "ragged",
                   partial: bool = False):
    """x ``[N, d]``, idx/weights ``[N, K]`` -> ``[N, d]`` (fp32). ``impl``: "ragged" (lax) or "tokamax".
    ``partial``: ids ``>= E`` (experts held on other devices) contribute nothing here."""
    N, K = idx.shape
    E = w1.shape[0]
    rdot = _ragged_dot(impl)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // K
    xs = jnp.take(x, token, axis=0).astype(dtype)
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    mm = lambda a, w: rdot(a, w.astype(dtype), sizes, preferred_element_type=jnp.float32).astype(jnp.float32)
    h = swiglu(mm(xs, w1), mm(xs, w3), limit)
    h = h * jnp.take(weights.reshape(-1), order)[:, None].astype(jnp.float32)
    ys = mm(h.astype(dtype), w2)
    if partial:                          # ids >= E sort past every group: rows no ragged_dot defines
        ys = ys * (jnp.take(flat, order) < E)[:, None]
    return jnp.zeros((N, x.shape[-1]), jnp.float32).at[token].add(ys)


def block_rows(n_pairs: int, n_experts: int) -> int:
    """Rows per block of ``experts_blocked``: the mean group size rounded down to a power of two,
    in ``[1, MAX_BLOCK]`` (1 at decode, where only the selected experts' weights are read). Each
    block gathers its expert's matrices, so small blocks trade padding FLOPs for weight reads."""
    target = max(1, n_pairs // n_experts)
    return min(MAX_BLOCK, 1 << (target.bit_length() - 1))


def block_layout(idx: jnp.ndarray, n_experts: int, b: int, capacity: int | None = None):
    """The block dispatch plan of idx ``[N, K]`` (static ``b`` rows per block).

    Returns (slot_pair ``[S]``: the flat (token * K + k) pair in each of the ``S = nb * b`` slots,
    slot_valid ``[S]`` bool, block_expert ``[nb]``, pair_slot ``[N, K]``: the slot of each pair,
    pair_ok ``[N, K]`` bool: the pair has a slot). Pairs are sorted by expert (stable); expert e owns
    ``ceil(count_e / b)`` consecutive blocks. Ids ``>= n_experts`` (experts held elsewhere, see
    ``v4jax.moe.expert_parallel``) get no slot. ``nb = (capacity + E (b - 1)) // b`` blocks with
    ``capacity = N K`` by default bound what any routing can need (dropless); a smaller capacity
    leaves the pairs sorted past the last block without a slot (``pair_ok`` False)."""
    N, K = idx.shape
    E, M = n_experts, N * K
    cap = M if capacity is None else min(int(capacity), M)
    nb = max(1, (cap + E * (b - 1)) // b)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)                      # sorted position -> pair
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)      # ids >= E are not counted
    start = jnp.cumsum(sizes) - sizes                            # first sorted position of e
    nblk = (sizes + b - 1) // b
    bend = jnp.cumsum(nblk)
    bstart = bend - nblk                                         # first block of e
    block_expert = jnp.minimum(jnp.searchsorted(bend, jnp.arange(nb), side="right"), E - 1).astype(jnp.int32)
    slot = jnp.arange(nb * b)
    e_s = block_expert[slot // b]
    off = slot - bstart[e_s] * b
    slot_valid = (off < sizes[e_s]) & (slot // b < bend[-1])
    slot_pair = order[jnp.where(slot_valid, start[e_s] + off, 0)]
    rank = jnp.zeros((M,), jnp.int32).at[order].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)
    fe = jnp.minimum(flat, E - 1)
    pair_slot = bstart[fe] * b + rank - start[fe]
    pair_ok = (flat < E) & (pair_slot < nb * b)
    pair_slot = jnp.where(pair_ok, pair_slot, 0)
    return slot_pair, slot_valid, block_expert, pair_slot.reshape(N, K), pair_ok.reshape(N, K)


def experts_blocked(x, idx, weights, w1, w2, w3, limit, dtype=jnp.float32, block: int | None = None,
                    capacity: int | None = None, partial: bool = False, count: bool = False):
    """x ``[N, d]``, idx/weights ``[N, K]`` -> ``[N, d]`` (fp32). See the module docstring.

    ``partial``: ids ``>= E`` (experts held on other devices) contribute nothing here, and
    ``capacity`` may cap the pairs placed (``block_layout``). ``count``: also return the number of
    pairs placed in a block (computed)."""
    N, K = idx.shape
    E, d = w1.shape[0], x.shape[-1]     # w1 [E, d, I] (an array or a QuantizedWeight)
    b = block or block_rows(N * K if capacity is None else int(capacity), E)
    slot_pair, valid, be, pair_slot, pair_ok = block_layout(idx, E, b, capacity)
    nb = be.shape[0]
    take = lambda a, i: a.at[i].get(mode="promise_in_bounds")
    xs = take(x, slot_pair // K).astype(dtype).reshape(nb, b, d)
    wv = jnp.where(valid, take(weights.reshape(-1), slot_pair), 0.0).astype(jnp.float32)

    def mm(a, w):   # [nb, b, in] x (each block's expert matrix [in, out]) -> fp32 [nb, b, out]
        # a native (quantized) weight: only the gathered experts' codes are dequantized
        return jnp.einsum("jbi,jio->jbo", a, dequantize(qtake(w, be), dtype), preferred_element_type=jnp.float32)

    h = swiglu(mm(xs, w1), mm(xs, w3), limit) * wv.reshape(nb, b, 1)
    ys = mm(h.astype(dtype), w2).reshape(nb * b, d)
    got = take(ys, pair_slot)                                    # [N, K, d]
    if partial or capacity is not None:
        got = got * pair_ok[..., None]
    y = jnp.sum(got, axis=1)
    return (y, jnp.sum(valid.astype(jnp.int32))) if count else y


# per-expert capacities of ``experts_grouped``, in units of the balanced load N K / E
GROUP_LEVELS = (1.25, 1.5, 2.0)
# below this many pairs per expert (decode, small batches) ``experts_grouped`` runs ``experts_blocked``
MIN_GROUP_LOAD = 16


def group_capacities(n_pairs: int, n_experts: int, levels=GROUP_LEVELS, multiple: int = 8) -> list[int]:
    """The static rows per expert of ``experts_grouped``: each level times the balanced load,
    rounded up to ``multiple``, at most ``n_pairs``; sorted, distinct."""
    mean = n_pairs / n_experts
    return sorted({min(n_pairs, -(-math.ceil(lv * mean) // multiple) * multiple) for lv in levels})


def group_layout(idx: jnp.ndarray, n_experts: int, capacity: int):
    """The ``[E, C]`` plan of idx ``[N, K]``: (slot_pair ``[E, C]``: the flat (token * K + k) pair
    in each slot, slot_valid ``[E, C]``, pair_slot ``[N, K]``: the flat slot ``e * C + c`` of each
    pair, pair_ok ``[N, K]``: the pair has a slot, i.e. it is among its expert's first C in pair
    order). Dropless only when every expert's load is at most C (``experts_grouped`` checks)."""
    N, K = idx.shape
    E, C, M = n_experts, capacity, N * K
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)                      # sorted position -> pair
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    start = jnp.cumsum(sizes) - sizes
    c = jnp.arange(C, dtype=jnp.int32)
    slot_valid = c[None, :] < sizes[:, None]
    slot_pair = order[jnp.where(slot_valid, start[:, None] + c[None, :], 0)]
    rank = jnp.zeros((M,), jnp.int32).at[order].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)
    within = rank - start[flat]
    pair_ok = within < C
    pair_slot = jnp.where(pair_ok, flat * C + within, 0)
    return slot_pair, slot_valid, pair_slot.reshape(N, K), pair_ok.reshape(N, K)


def _experts_at_capacity(x, idx, weights, w1, w2, w3, limit, dtype, capacity: int):
    """``experts_grouped`` at one static capacity (every expert's load must fit)."""
    N, K = idx.shape
    E, d, inter = w1.shape[0], x.shape[-1], w1.shape[-1]
    slot_pair, valid, pair_slot, _ = group_layout(idx, E, capacity)
    take = lambda a, i: a.at[i].get(mode="promise_in_bounds")
    xs = take(x, slot_pair // K).astype(dtype)                               # [E, C, d]
    wv = jnp.where(valid, take(weights.reshape(-1), slot_pair), 0.0).astype(jnp.float32)
    w13 = jnp.concatenate([w1, w3], axis=-1).astype(dtype)                    # [E, d, 2I]: one matmul
    h13 = jnp.einsum("ecd,edi->eci", xs, w13, preferred_element_type=jnp.float32)
    h = swiglu(h13[..., :inter], h13[..., inter:], limit) * wv[..., None]
    ys = jnp.einsum("eci,eid->ecd", h.astype(dtype), w2.astype(dtype),
                    preferred_element_type=jnp.float32).reshape(E * capacity, d)
    return jnp.sum(take(ys, pair_slot), axis=1)


def _grouped_fallback(x, idx, weights, w1, w2, w3, limit, dtype, caps):
    """The rare paths of ``experts_grouped``: the next capacity level that fits, else blocked."""
    loads = jnp.bincount(idx.reshape(-1), length=w1.shape[0])
    level = sum((jnp.max(loads) > c).astype(jnp.int32) for c in caps[1:])
    branches = [functools.partial(_experts_at_capacity, limit=limit, dtype=dtype, capacity=c) for c in caps[1:]]
    branches.append(functools.partial(experts_blocked, limit=limit, dtype=dtype))
    return jax.lax.switch(level, branches, x, idx, weights, w1, w2, w3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _grouped(x, idx, weights, w1, w2, w3, limit, dtype, caps):
    y = _experts_at_capacity(x, idx, weights, w1, w2, w3, limit, dtype, caps[0])
    over = jnp.max(jnp.bincount(idx.reshape(-1), length=w1.shape[0])) > caps[0]
    fall = lambda *a: _grouped_fallback(*a, limit, dtype, caps)
    return jax.lax.cond(over, fall, lambda *a: y, x, idx, weights, w1, w2, w3)


def _grouped_fwd(x, idx, weights, w1, w2, w3, limit, dtype, caps):
    fast = lambda x, weights, w1, w2, w3: _experts_at_capacity(x, idx, weights, w1, w2, w3, limit, dtype, caps[0])
    y, pull = jax.vjp(fast, x, weights, w1, w2, w3)
    over = jnp.max(jnp.bincount(idx.reshape(-1), length=w1.shape[0])) > caps[0]
    fall = lambda *a: _grouped_fallback(*a, limit, dtype, caps)
    y = jax.lax.cond(over, fall, lambda *a: y, x, idx, weights, w1, w2, w3)
    return y, (pull, over, (x, idx, weights, w1, w2, w3))


def _grouped_bwd(limit, dtype, caps, res, g):
    pull, over, (x, idx, weights, w1, w2, w3) = res
    fast = pull(g)                                    # the common path, outside any conditional

    def slow(g):
        f = lambda x, weights, w1, w2, w3: _grouped_fallback(x, idx, weights, w1, w2, w3, limit, dtype, caps)
        return jax.vjp(f, x, weights, w1, w2, w3)[1](g)

    dx, dw, d1, d2, d3 = jax.lax.cond(over, slow, lambda g: fast, g)
    return dx, None, dw, d1, d2, d3


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def experts_grouped(x, idx, weights, w1, w2, w3, limit, dtype=jnp.float32, levels=GROUP_LEVELS):
    """x ``[N, d]``, idx/weights ``[N, K]`` (ids in ``[0, E)``) -> ``[N, d]`` (fp32), dropless.
    See the module docstring: ``[E, C, d]`` token groups at the smallest capacity level that holds
    the largest expert's load, else (and for fewer than ``MIN_GROUP_LOAD`` pairs per expert)
    ``experts_blocked``.

    The first level runs unconditionally, forward and backward; only when the largest load
    exceeds it does a conditional recompute at the next level (or blocked). The gradient is a
    ``custom_vjp`` so that autodiff never transposes the conditional: differentiating a
    ``lax.cond`` carries every branch's residuals (zero-filled when not taken), and XLA:CPU runs
    the thunks inside a conditional one at a time; with the MoE inside one the tiny train step
    was 1.6x slower (experiments/results/throughput)."""
    N, K = idx.shape
    E = w1.shape[0]
    if N * K < MIN_GROUP_LOAD * E:
        return experts_blocked(x, idx, weights, w1, w2, w3, limit, dtype)
    caps = tuple(group_capacities(N * K, E, levels))
    return _grouped(x, idx, weights, w1, w2, w3, float(limit), jnp.dtype(dtype), caps)


def experts_dense(x, idx, weights, w1, w2, w3, limit):
    """Oracle: every expert on every token, combined with the routing weights. fp32."""
    E = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * weights[..., None], axis=-2)  # [N,E]
    xf = x.astype(jnp.float32)
    h = swiglu(jnp.einsum("nd,edi->eni", xf, w1), jnp.einsum("nd,edi->eni", xf, w3), limit)
    y = jnp.einsum("eni,eid->end", h, w2.astype(jnp.float32))
    return jnp.einsum("end,ne->nd", y, combine)
