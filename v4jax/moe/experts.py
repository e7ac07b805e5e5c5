"""Routed experts as stacked weights ``w1, w3 [E, d, I]``, ``w2 [E, I, d]`` with the clamped
SwiGLU of spec 5: ``g = min(x W1, L)``, ``v = clip(x W3, -L, L)``, ``y = (w * silu(g) * v) W2``.

Three dropless dispatches with the same values (tested against each other), chosen by
``Runtime.moe`` (``resolve_impl``):

* ``experts_blocked`` (CPU default): the (token, expert) pairs are sorted by expert and cut into
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

import jax
import jax.numpy as jnp

from v4jax.layers.linear import silu

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
    """``Runtime.moe`` -> the dispatch actually run. ``"auto"``: ``"blocked"`` on CPU,
    ``"tokamax"`` on GPU/TPU when tokamax is installed, else ``"ragged"`` (``lax.ragged_dot``)."""
    if impl != "auto":
        if impl == "tokamax" and not tokamax_available():
            raise ImportError("Runtime(moe='tokamax') needs the optional tokamax package: pip install 'v4jax[tokamax]'")
        return impl
    if jax.default_backend() == "cpu":
        return "blocked"
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
    E, d = w1.shape[0], x.shape[-1]
    b = block or block_rows(N * K if capacity is None else int(capacity), E)
    slot_pair, valid, be, pair_slot, pair_ok = block_layout(idx, E, b, capacity)
    nb = be.shape[0]
    take = lambda a, i: a.at[i].get(mode="promise_in_bounds")
    xs = take(x, slot_pair // K).astype(dtype).reshape(nb, b, d)
    wv = jnp.where(valid, take(weights.reshape(-1), slot_pair), 0.0).astype(jnp.float32)

    def mm(a, w):   # [nb, b, in] x (each block's expert matrix [in, out]) -> fp32 [nb, b, out]
        return jnp.einsum("jbi,jio->jbo", a, take(w, be).astype(dtype), preferred_element_type=jnp.float32)

    h = swiglu(mm(xs, w1), mm(xs, w3), limit) * wv.reshape(nb, b, 1)
    ys = mm(h.astype(dtype), w2).reshape(nb * b, d)
    got = take(ys, pair_slot)                                    # [N, K, d]
    if partial or capacity is not None:
        got = got * pair_ok[..., None]
    y = jnp.sum(got, axis=1)
    return (y, jnp.sum(valid.astype(jnp.int32))) if count else y


def experts_dense(x, idx, weights, w1, w2, w3, limit):
    """Oracle: every expert on every token, combined with the routing weights. fp32."""
    E = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * weights[..., None], axis=-2)  # [N,E]
    xf = x.astype(jnp.float32)
    h = swiglu(jnp.einsum("nd,edi->eni", xf, w1), jnp.einsum("nd,edi->eni", xf, w3), limit)
    y = jnp.einsum("eni,eid->end", h, w2.astype(jnp.float32))
    return jnp.einsum("end,ne->nd", y, combine)
