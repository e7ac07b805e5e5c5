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
load. ``Runtime.ep_capacity = c`` sizes them for ``c`` times the balanced load instead; the pairs
beyond it are dropped and COUNTED (``dropped`` in the router statistics, ``moe_dropped`` in the
train metrics). When the batch cannot be split over the batch axes (decode with B = 1), tokens
stay replicated and each device computes its experts' share for all of them (``psum``).

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
    n_group = (N // batch_shards(mesh) * S) if split else N          # tokens a device sees
    cap = None if capacity is None else max(1, math.ceil(capacity * n_group * K / S))
    b = block_rows(max(1, n_group * K // S), E_loc)                 # rows per block: the balanced load

    def body(x, idx, wts, w1, w2, w3):
        s = jax.lax.axis_index("expert")
        if split:
            x, idx, wts = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, idx, wts))
        local = (idx // E_loc) == s
        lidx = jnp.where(local, idx - s * E_loc, E_loc)
        lw = jnp.where(local, wts, 0.0)
        if impl in ("blocked", "grouped"):      # grouped has no partial ids: its fallback, blocked, runs here
            y, placed = experts_blocked(x, lidx, lw, w1, w2, w3, limit, dtype, block=b, capacity=cap,
                                        partial=True, count=True)
        elif impl == "dense":
            y = experts_dense(x, jnp.minimum(lidx, E_loc - 1), lw, w1.astype(dtype), w2.astype(dtype),
                              w3.astype(dtype), limit)
            placed = jnp.sum(local.astype(jnp.int32))
        else:
            y = experts_ragged(x, lidx, lw, w1, w2, w3, limit, dtype, impl, partial=True)
            placed = jnp.sum(local.astype(jnp.int32))
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


__all__ = ["experts_expert_parallel", "expert_shards"]
