"""Expert parallelism: routed experts sharded over the mesh axis ``expert``, tokens sent to the
devices that hold their experts and back (``jax.shard_map``; the rest of the model stays GSPMD).

Dispatch ("expert-group gather", the all-gather / reduce-scatter form of expert parallelism; the
``ragged_all_to_all`` form does not run on XLA:CPU, and with top-6 routing the all-gather moves
about as many bytes as a fixed-capacity ``all_to_all`` would, since every token is sent to up to
``K`` devices there). Per device, with ``S`` expert shards holding ``E / S`` experts each:

1. the tokens of the devices in its expert group (the ``S`` devices that differ only in their
   ``expert`` coordinate) are gathered (``all_gather`` over ``expert``, with their routes);
2. the pairs routed to the local experts run through the local dispatch (``experts_blocked`` on
   CPU, ``lax.ragged_dot`` / tokamax on GPU/TPU); pairs of other devices' experts contribute
   nothing here (``partial``);
3. the partial outputs are summed back to the tokens' own devices (``psum_scatter`` over
   ``expert``; with ``tensor`` also a ``psum`` of the MLP-sharded products).

Dropless by default: the static block bound covers every pair landing on one device. The cost of a
static shape is that bound: each device's expert blocks are sized for ``S`` times the balanced
load, and the gathered tokens are ``S`` times the device's own.

With a capacity (``Runtime.ep_capacity = c``, #21) the exchange is an all-to-all instead
(``experts_all_to_all``): each device sends every (source, destination) pair of shards at most
``C = ceil(c N_loc K / S)`` rows (its pairs in (token, k) order; the rest are dropped and COUNTED:
``dropped`` in the router statistics, ``moe_dropped`` in the train metrics), the destination runs
its ``S C = c N_loc K`` rows through its local experts and sends the outputs back, where each token
sums its pairs. Dispatch memory is ``c`` times the balanced load, whatever ``S``. The exchange
(``exchange``) is ``jax.lax.ragged_all_to_all`` on TPU and GPU (only the filled rows move) and an
``all_to_all`` of the padded ``[S, C, d]`` buffers on CPU (XLA:CPU has no ragged-all-to-all), one
function chosen by backend; both give the same buffers. When the batch cannot be split over the
batch axes (decode with B = 1), tokens stay replicated and each device computes its experts'
share for all of them (``psum``), with nothing dropped.

Routing, the balance statistics and the bias update are computed outside, on the global batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from v4jax.moe.experts import block_rows, experts_blocked, experts_dense, experts_ragged
from v4jax.sharding import axis_size, batch_axes, batch_shards


def expert_shards(mesh) -> int:
    return 1 if mesh is None else int(mesh.shape.get("expert", 1))


def experts_expert_parallel(x, idx, weights, w1, w2, w3, limit, dtype, impl: str, mesh,
                            capacity: float | None = None):
    """x ``[N, d]``, idx/weights ``[N, K]`` (global arrays), ``w1, w3 [E, d, I]``, ``w2 [E, I, d]``
    (``E`` split over ``expert``, ``I`` over ``tensor``) -> (y ``[N, d]`` fp32, pairs placed: int32
    scalar, summed over the whole batch). ``impl``: the local dispatch ("blocked", "ragged",
    "tokamax", "dense"). ``capacity``: None (dropless) or the factor ``c`` above."""
    S = expert_shards(mesh)
    N, K = idx.shape
    E = w1.shape[0]
    if E % S:
        raise ValueError(f"{E} routed experts cannot be split over expert={S} devices")
    E_loc = E // S
    baxes = batch_axes(mesh)
    split = N % batch_shards(mesh) == 0 and "expert" in baxes
    tok = P(baxes) if split else P()
    t = "tensor" if axis_size(mesh, "tensor") > 1 else None
    other = tuple(a for a in baxes if a != "expert") if split else ()
    if capacity is not None and split:
        return experts_all_to_all(x, idx, weights, w1, w2, w3, limit, dtype, impl, mesh, capacity)
    n_group = (N // batch_shards(mesh) * S) if split else N          # tokens a device sees
    b = block_rows(max(1, n_group * K // S), E_loc)                 # rows per block: the balanced load

    def body(x, idx, wts, w1, w2, w3):
        s = jax.lax.axis_index("expert")
        if split:
            x, idx, wts = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, idx, wts))
        local = (idx // E_loc) == s
        lidx = jnp.where(local, idx - s * E_loc, E_loc)
        y = _local_experts(x, lidx, jnp.where(local, wts, 0.0), w1, w2, w3, limit, dtype, impl, b)
        placed = jnp.sum(local.astype(jnp.int32))                    # dropless: every local pair
        if t is not None:
            y = jax.lax.psum(y, t)
        if split:
            y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        else:
            y = jax.lax.psum(y, "expert")
        placed = jax.lax.psum(placed, ("expert",) + other)
        return y, placed

    w13, w2s = P("expert", None, t), P("expert", t, None)
    f = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w13, w2s, w13), out_specs=(tok, P()),
                      check_vma=False)
    return f(x, idx, weights, w1, w2, w3)


def _local_experts(x, lidx, lw, w1, w2, w3, limit, dtype, impl, block):
    """The local dispatch of expert parallelism: ids ``>= E_loc`` (other devices' experts, or
    empty rows) contribute nothing."""
    E_loc = w1.shape[0]
    if impl in ("blocked", "grouped"):      # grouped has no partial ids: its fallback, blocked, runs here
        return experts_blocked(x, lidx, lw, w1, w2, w3, limit, dtype, block=block, partial=True)
    if impl == "dense":
        return experts_dense(x, jnp.minimum(lidx, E_loc - 1), jnp.where(lidx < E_loc, lw, 0.0), w1.astype(dtype),
                             w2.astype(dtype), w3.astype(dtype), limit)
    return experts_ragged(x, lidx, lw, w1, w2, w3, limit, dtype, impl, partial=True)


def _platform(mesh) -> str:
    """The platform of ``mesh``'s devices (a TPU topology's compile-only devices on a CPU host
    count as TPU); the default backend for a mesh without devices."""
    devices = getattr(mesh, "devices", None)
    try:
        return devices.flat[0].platform
    except (AttributeError, IndexError, TypeError):
        return jax.default_backend()


def exchange(buf, counts, axis: str, ragged: bool):
    """All-to-all of ``buf [S * C, ...]`` over mesh axis ``axis`` (inside ``shard_map``): chunk j
    (rows ``j C .. j C + counts[j]``, the rest zeros) goes to device j, which receives it as its
    chunk ``i`` (the sender's index). ``ragged``: ``jax.lax.ragged_all_to_all``, moving only the
    filled rows (TPU, GPU); otherwise ``jax.lax.all_to_all`` of the padded buffer (CPU). Same result."""
    S = counts.shape[0]
    C = buf.shape[0] // S
    if not ragged:
        return jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)
    me = jax.lax.axis_index(axis)
    recv = jax.lax.all_to_all(counts, axis, 0, 0, tiled=True)        # what each source sends me
    starts = jnp.arange(S, dtype=jnp.int32) * C
    return jax.lax.ragged_all_to_all(buf, jnp.zeros_like(buf), starts, counts.astype(jnp.int32),
                                     jnp.full((S,), me * C, jnp.int32), recv.astype(jnp.int32), axis_name=axis)


def experts_all_to_all(x, idx, weights, w1, w2, w3, limit, dtype, impl: str, mesh, capacity: float,
                       ragged: bool | None = None):
    """Capacity expert parallelism (module docstring): same arguments and return as
    ``experts_expert_parallel``, with the batch split over the batch axes (``expert`` among them).
    ``ragged``: the exchange's form; None: ``ragged_all_to_all`` unless the mesh's devices are CPUs."""
    S = expert_shards(mesh)
    N, K = idx.shape
    E_loc = w1.shape[0] // S
    baxes = batch_axes(mesh)
    n = N // batch_shards(mesh)                                      # tokens per device
    C = max(1, math.ceil(capacity * n * K / S))                      # rows per (source, destination)
    t = "tensor" if axis_size(mesh, "tensor") > 1 else None
    if ragged is None:
        ragged = _platform(mesh) != "cpu"
    b = block_rows(max(1, n * K), E_loc)       # a destination receives n K pairs when balanced

    def body(x, idx, wts, w1, w2, w3):
        d = x.shape[-1]
        dest = (idx // E_loc).reshape(-1)                            # [n K] pairs in (token, k) order
        hot = dest[:, None] == jnp.arange(S)[None, :]
        pos = jnp.take_along_axis(jnp.cumsum(hot, axis=0, dtype=jnp.int32), dest[:, None], axis=1)[:, 0] - 1
        ok = pos < C
        slot = jnp.where(ok, dest * C + pos, S * C)                  # S * C: the dropped pairs' bin
        counts = jnp.minimum(jnp.sum(hot, axis=0, dtype=jnp.int32), C)
        token = jnp.arange(n * K) // K
        send = jnp.zeros((S * C + 1, d), x.dtype).at[slot].add(x[token])[:-1]    # slots are distinct
        eid = jnp.full((S * C + 1,), E_loc, jnp.int32).at[slot].set((idx.reshape(-1) - dest * E_loc).astype(jnp.int32))[:-1]
        rx = exchange(send, counts, "expert", ragged)
        # empty rows carry id E_loc (no expert) whatever the exchange left there
        re = exchange(eid[:, None] - E_loc, counts, "expert", ragged)[:, 0] + E_loc
        y = _local_experts(rx, re[:, None], jnp.ones((S * C, 1), jnp.float32), w1, w2, w3, limit, dtype, impl, b)
        if t is not None:
            y = jax.lax.psum(y, t)
        back = exchange(y, jax.lax.all_to_all(counts, "expert", 0, 0, tiled=True), "expert", ragged)
        back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)])[slot]          # dropped pairs: 0
        out = jnp.sum(back.reshape(n, K, d) * wts.astype(jnp.float32)[..., None], axis=1)
        placed = jax.lax.psum(jnp.sum(ok.astype(jnp.int32)), baxes)
        return out, placed

    tok = P(baxes)
    w13, w2s = P("expert", None, t), P("expert", t, None)
    f = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w13, w2s, w13), out_specs=(tok, P()),
                      check_vma=False)
    return f(x, idx, weights, w1, w2, w3)


__all__ = ["exchange", "expert_shards", "experts_all_to_all", "experts_expert_parallel"]
