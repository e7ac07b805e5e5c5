"""DeepSeek-V4's optimizer: Muon (report Algorithm 1) for matrices, AdamW for the rest, V4 LR schedule.

Spec: ``techniques.md`` 2.3 (V4 Muon), 2.6 (optax.contrib.muon pitfalls); ``deepseek_v4_architecture.md``
section 9 (training facts); ``jax_ecosystem.md`` 3 (optax 0.2.8 Muon).

    cfg = OptimizerConfig(total_steps=10_000, decay_start=8_000, warmup_steps=200)
    tx = make_optimizer(cfg, params)                 # params: real arrays or ShapeDtypeStructs
    opt_state = tx.init(params)                      # plain pytree of arrays (orbax-saveable)
    updates, opt_state = tx.update(grads, opt_state, params)   # jit-able
    params = optax.apply_updates(params, updates)

Layout: ``chain(clip_by_global_norm(clip), multi_transform({"muon": ..., "adamw": ...}, param_labels))``

- ``"muon"``: ``chain(scale_by_v4_muon, add_decayed_weights(wd), scale_by_learning_rate(lr_schedule))``,
  i.e. ``W <- W (1 - lr wd) - lr O`` with ``O = 0.18 sqrt(max(n, m)) HybridNS(mu M + G)``, ``M <- mu M + G``.
- ``"adamw"``: ``optax.adamw(lr_schedule, b1=0.9, b2=0.95, eps=1e-20, weight_decay=wd)``.

Why not ``optax.contrib.muon`` / ``scale_by_muon`` (0.2.8), although it takes a per-step ``ns_coeffs``
table (with ``ns_steps=10``) and ``consistent_rms=0.18``:

1. *Momentum form.* It keeps a bias-corrected EMA and orthogonalises
   ``beta m_hat(count+1) + (1-beta) g_hat(count)``; the two bias corrections differ, so the NS input is
   proportional to V4's sum-form ``mu M_t + G_t`` only asymptotically (NS removes the overall scale, not
   the early-step mix of M and G). ``optax.trace(mu, nesterov=True)`` is *exactly* V4's form
   (``M <- G + mu M``; output ``G + mu M``), so it is reused here.
2. *Logical matrices.* ``MuonDimensionNumbers`` can turn leading axes into batch axes (experts, ``wo_a``
   groups) but cannot split one axis into independent blocks, which the CSA compressor's fused
   ``[d, 2c]`` ``wkv``/``wgate`` need.
3. *Routing.* Its built-in Adam fallback routes by ndim (the 2-D embedding and head would go to Muon) and
   its Adam weight decay defaults to 0; V4 routes by name (``param_labels``).

So only the orthogonalisation (``hybrid_newton_schulz`` + per-logical-matrix reshaping, ``MatrixView``) is
written here; momentum, weight decay, learning rate, AdamW, clipping, partitioning and the schedule are
optax's own.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from v4jax.config import ConfigError
from v4jax.sharding import active_mesh, constrain, mesh_axes_of, to_mesh_spec

MUON, ADAMW = "muon", "adamw"

# (a, b, c) per iteration. V4: 8 fast Keller-Jordan steps, then 2 steps of f(x) = 2x - 1.5x^3 + 0.5x^5
# (f(1) = 1, f'(1) = 0), which pin every singular value at 1.
KELLER_NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 5
V4_NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2


# ---------------------------------------------------------------------------------------------
# Hybrid Newton-Schulz
# ---------------------------------------------------------------------------------------------


def hybrid_newton_schulz(x: jax.Array, coeffs=V4_NS_COEFFS, eps: float = 1e-7,
                         matmul_dtype=jnp.float32, shard: Callable[[jax.Array, str], jax.Array] | None = None
                         ) -> jax.Array:
    """Approximate ``U V^T`` of each matrix ``x[..., n, m]`` (leading axes are batch axes).

    ``X0 = X / (||X||_F + eps)`` (short side as rows), then per row ``(a, b, c)`` of ``coeffs``
    (a ``lax.scan``): ``A = X X^T``, ``X <- a X + (b A + c A^2) X``. X is carried in fp32; the matmul
    operands are cast to ``matmul_dtype`` (e.g. ``jnp.bfloat16``) with fp32 accumulation. Returns the
    input dtype.

    ``shard(t, kind)`` (distributed Muon, ``orthogonalize_updates`` under a mesh) places the
    iterate (``kind="x"``, ``[..., short, long]``) and its Gram matrix (``"gram"``, ``[..., short,
    short]``) once per iteration; the identity when None. Placement changes where the work runs,
    not the values.
    """
    table = jnp.asarray(coeffs, jnp.float32)
    if table.ndim != 2 or table.shape[-1] != 3 or table.shape[0] == 0:
        raise ValueError(f"coeffs must have shape (steps, 3), got {table.shape}")
    if x.ndim < 2:
        raise ValueError(f"hybrid_newton_schulz needs [..., n, m], got shape {x.shape}")
    tall = x.shape[-2] > x.shape[-1]
    y = x.astype(jnp.float32)
    if tall:
        y = jnp.swapaxes(y, -1, -2)
    y = y / (jnp.sqrt(jnp.sum(y * y, axis=(-2, -1), keepdims=True)) + eps)

    def mm(p, q):
        return jnp.matmul(p.astype(matmul_dtype), q.astype(matmul_dtype), preferred_element_type=jnp.float32)

    place = shard or (lambda t, kind: t)

    def step(y, abc):
        y = place(y, "x")
        a = place(mm(y, jnp.swapaxes(y, -1, -2)), "gram")
        return place(abc[0] * y + mm(abc[1] * a + abc[2] * mm(a, a), y), "x"), None

    y, _ = jax.lax.scan(step, place(y, "x"), table)
    if tall:
        y = jnp.swapaxes(y, -1, -2)
    return y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Logical matrices of a leaf
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixView:
    """How one parameter leaf is cut into logically independent ``[n, m]`` matrices for Muon.

    ``batch``: number of leading axes indexing independent matrices (routed experts ``[E, in, out]``,
    ``wo_a`` groups ``[g, in, out]``). ``col_blocks``: the last axis is the concatenation of this many
    equal column blocks, each its own matrix (CSA compressor ``wkv``/``wgate`` ``[d, 2c]``: 2 blocks).
    """

    batch: int = 0
    col_blocks: int = 1

    def check(self, shape: tuple[int, ...], path: str = "") -> None:
        if len(shape) != self.batch + 2 or self.col_blocks < 1 or shape[-1] % self.col_blocks:
            raise ValueError(f"{path or 'leaf'}: shape {tuple(shape)} does not fit {self}")

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(n, m)`` of each logical matrix."""
        return shape[-2], shape[-1] // self.col_blocks

    def to_matrices(self, x: jax.Array) -> jax.Array:
        """``[*batch, n, k*m] -> [*batch, k, n, m]``."""
        *lead, n, w = x.shape
        k = self.col_blocks
        return jnp.moveaxis(x.reshape(*lead, n, k, w // k), -2, -3)

    def from_matrices(self, y: jax.Array) -> jax.Array:
        """Inverse of ``to_matrices``."""
        *lead, k, n, m = y.shape
        return jnp.moveaxis(y, -3, -2).reshape(*lead, n, k * m)


Views = Mapping[str, MatrixView] | Callable[[str, Any], MatrixView] | None


def path_str(path) -> str:
    """``"layers_1/attn/wo_a"`` for a ``jax.tree_util`` key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _view_for(views: Views, path: str, leaf) -> MatrixView:
    if views is None:
        view = MatrixView(batch=max(leaf.ndim - 2, 0))
    elif callable(views):
        view = views(path, leaf)
    elif path in views:
        view = views[path]
    else:
        raise KeyError(f"Muon got parameter {path!r} but has no MatrixView for it")
    view.check(leaf.shape, path)
    return view


# ---------------------------------------------------------------------------------------------
# Distributed Muon: which devices orthogonalise which matrices (#21)
# ---------------------------------------------------------------------------------------------


def ns_flops(short: int, long: int, steps: int) -> float:
    """FLOPs of ``hybrid_newton_schulz`` on one ``short x long`` matrix: per step ``X X^T``
    (``2 s^2 l``), ``A A`` (``2 s^3``) and ``B X`` (``2 s^2 l``)."""
    return steps * (4 * short * short * long + 2 * short ** 3)


@dataclass(frozen=True)
class MuonSplit:
    """Where one leaf's ``K`` logical matrices (each ``short x long``) are orthogonalised on a mesh:
    the batch of matrices split over ``k_axes`` (each device owns ``ceil(K / k_shards)`` whole
    matrices, zero-padded), and, for a leaf with fewer matrices than devices, each matrix's long
    side (and its Gram matrix's rows) split over ``l_axes`` as well (tensor-parallel NS)."""

    k_axes: tuple[str, ...]
    l_axes: tuple[str, ...] = ()

    def shards(self, mesh_shape: Mapping[str, int]) -> tuple[int, int]:
        """``(k_shards, l_shards)``."""
        return (math.prod(int(mesh_shape[a]) for a in self.k_axes),
                math.prod(int(mesh_shape[a]) for a in self.l_axes))

    def flops_per_device(self, mat: tuple[int, int, int], mesh_shape: Mapping[str, int], steps: int = 1) -> float:
        """Newton-Schulz FLOPs each device runs for ``mat = (K, short, long)``: its
        ``ceil(K / k_shards)`` matrices (padded slots included), each ``1 / l_shards`` of one."""
        dk, dl = self.shards(mesh_shape)
        return -(-mat[0] // dk) * ns_flops(mat[1], mat[2], steps) / dl


def muon_layout(mats: Mapping[str, tuple[int, int, int]], mesh_shape: Mapping[str, int],
                slack: float = 1.08) -> dict[str, MuonSplit]:
    """Distributed Muon's assignment: ``mats`` ``{path: (K, short, long)}`` -> ``{path: MuonSplit}``.

    Every leaf starts with its matrices split over every mesh axis (each device orthogonalises
    ``ceil(K / devices)`` of them, so each logical matrix is orthogonalised once, not once per
    replica). A leaf with fewer matrices than devices then leaves devices idle (their padded
    slots), so while the busiest device's Newton-Schulz FLOPs exceed ``slack x total / devices``
    the leaf wasting most moves to the smallest ``l_axes`` that lowers its cost (both sides must
    divide by it): tensor-parallel NS, at the price of three ``short^2`` collectives per step.
    Deterministic (pure Python on shapes, so the planner reports what the step runs).
    """
    axes = tuple(a for a in mesh_shape if int(mesh_shape[a]) > 1)
    devices = math.prod(int(mesh_shape[a]) for a in axes)
    f = {p: ns_flops(s, l, 1) for p, (_, s, l) in mats.items()}

    def cost(p, l_axes):
        return MuonSplit(tuple(a for a in axes if a not in l_axes), l_axes).flops_per_device(mats[p], mesh_shape)

    options = {}
    for p, (_, s, l) in mats.items():
        subsets = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
        ok = [c for c in subsets if not s % math.prod(int(mesh_shape[a]) for a in c)
              and not l % math.prod(int(mesh_shape[a]) for a in c)]
        options[p] = sorted(ok, key=lambda c: (math.prod(int(mesh_shape[a]) for a in c), c))
    choice = {p: () for p in mats}
    ideal = sum(k * f[p] for p, (k, _, _) in mats.items()) / max(devices, 1)
    done: set = set()
    while sum(cost(p, choice[p]) for p in mats) > slack * ideal:
        todo = [p for p in mats if p not in done]
        if not todo:
            break
        p = max(todo, key=lambda q: (cost(q, choice[q]) - mats[q][0] * f[q] / devices, q))
        better = [c for c in options[p] if cost(p, c) < cost(p, choice[p]) * (1 - 1e-9)]
        if better:
            choice[p] = better[0]
        else:
            done.add(p)
    return {p: MuonSplit(tuple(a for a in axes if a not in choice[p]), choice[p]) for p in mats}


def muon_matrices(views: Mapping[str, MatrixView], shapes: Mapping[str, tuple[int, ...]]
                  ) -> dict[str, tuple[int, int, int]]:
    """``{path: (K, short, long)}``: each Muon leaf's number of logical matrices and their sides."""
    out = {}
    for p, view in views.items():
        shape = tuple(shapes[p])
        n, m = view.matrix_shape(shape)
        out[p] = (math.prod(shape[:view.batch]) * view.col_blocks, min(n, m), max(n, m))
    return out


def _distributed_ns(u, view: MatrixView, split: MuonSplit, logical, mesh, coeffs, eps, matmul_dtype, rms_scale):
    """One leaf's update under ``mesh`` (``orthogonalize_updates``): its matrices moved to their
    owners (``split``), Newton-Schulz there, the result back in the parameter's own sharding."""
    y = view.to_matrices(u)                                         # [*lead, k, n, m]
    tall = y.shape[-2] > y.shape[-1]
    nlead = y.ndim - 2
    lead_spec = tuple(to_mesh_spec(tuple(logical[:view.batch]), mesh, shape=u.shape[:view.batch])) \
        if logical is not None else ()
    lead_spec = lead_spec + (None,) * (nlead - len(lead_spec))
    # lead dims already split go first, so flattening keeps their blocks where they are and the
    # move to the owners is an all-to-all over the other axes
    order = sorted(range(nlead), key=lambda i: (lead_spec[i] is None, i))
    y = jnp.transpose(y, (*order, nlead, nlead + 1))
    lead_shape = y.shape[:nlead]
    K = math.prod(lead_shape)
    y = y.reshape(K, *y.shape[-2:])
    if tall:
        y = jnp.swapaxes(y, -1, -2)                                 # [K, short, long]
    first = [a for i in order for a in mesh_axes_of(lead_spec[i]) if a in split.k_axes]
    k_axes = tuple(first) + tuple(a for a in split.k_axes if a not in first)
    dk, _ = split.shards(mesh.shape)
    pad = -K % dk
    if pad:
        y = jnp.pad(y, ((0, pad), (0, 0), (0, 0)))       # zero matrices stay zero in NS
    kspec = k_axes or None
    lspec = split.l_axes or None
    x_sh = NamedSharding(mesh, PartitionSpec(kspec, None, lspec))
    g_sh = NamedSharding(mesh, PartitionSpec(kspec, lspec, None))
    shard = lambda t, kind: jax.lax.with_sharding_constraint(t, x_sh if kind == "x" else g_sh)
    o = hybrid_newton_schulz(shard(y, "x"), coeffs, eps, matmul_dtype, shard=shard)
    o = o[:K] * (rms_scale * math.sqrt(o.shape[-1]))                # sqrt(max(n, m)): long side
    if tall:
        o = jnp.swapaxes(o, -1, -2)
    o = o.reshape(*lead_shape, *o.shape[-2:])
    o = view.from_matrices(jnp.transpose(o, (*[order.index(i) for i in range(nlead)], nlead, nlead + 1)))
    return o if logical is None else constrain(o, tuple(logical))


def orthogonalize_updates(views: Views = None, coeffs=V4_NS_COEFFS, rms_scale: float = 0.18,
                          eps: float = 1e-7, matmul_dtype=jnp.float32,
                          bucket: bool = True, axes: Mapping[str, tuple] | None = None,
                          balance: float = 1.08) -> optax.GradientTransformation:
    """Stateless: each logical matrix ``U [n, m]`` of each leaf -> ``rms_scale sqrt(max(n, m)) HybridNS(U)``
    (so every logical matrix's update has RMS ``rms_scale``). ``views``: ``None`` (the last two axes are
    the matrix, leading axes batch), a ``{path: MatrixView}`` mapping, or ``f(path, leaf) -> MatrixView``.

    ``bucket``: stack the logical matrices of equal (short side, long side, dtype) across leaves and run
    one batched NS loop per bucket, as V4 batches same-shape matrices (on the tiny preset: 10 loops
    instead of 124, e.g. all 7 x 3 x 16 routed experts in one). Each matrix is still orthogonalised on its
    own (tested equal to ``bucket=False``). The concatenation copies the updates once. One device only:
    under a mesh the leaves are distributed one by one (below).

    Under a mesh (``v4jax.parallel.mesh_context``) Muon is distributed (#21): each logical matrix
    is orthogonalised once, on the device that owns it (``muon_layout``: the batch of a leaf's
    matrices split over all devices, and a leaf with fewer matrices than devices also split along
    each matrix's long side), its momentum moved there and the update moved back into the
    parameter's sharding by the compiler from the placements (``axes``: ``{path: logical axis
    names}``, the parameters' own). ``balance``: ``muon_layout``'s slack (the busiest device's NS
    FLOPs over total / devices that it accepts before splitting long sides, which costs collectives).
    Leaf by leaf: a bucket across leaves would mix their blocks.
    Tested equal to the one-device update on several meshes (tests/test_parallel.py).
    """
    def update_fn(updates, state, params=None):
        del params
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        mesh = active_mesh()
        paths = [path_str(path) for path, _ in flat]
        leaf_views = [_view_for(views, p, u) for p, (_, u) in zip(paths, flat, strict=True)]
        if mesh is not None and mesh.size > 1:
            layout = muon_layout(muon_matrices(dict(zip(paths, leaf_views, strict=True)),
                                               {p: u.shape for p, (_, u) in zip(paths, flat, strict=True)}),
                                 mesh.shape, balance)
            outs, prev = [], None
            for p, view, (_, u) in zip(paths, leaf_views, flat, strict=True):
                if prev is not None:
                    # one leaf after another: the owners' working set is one leaf's, and every
                    # device meets the collectives in the same order (XLA:CPU runs independent
                    # leaves concurrently, in an order of its own per device: a deadlock)
                    prev, u = jax.lax.optimization_barrier((prev, u))
                    outs[-1] = prev
                prev = _distributed_ns(u, view, layout[p], (axes or {}).get(p), mesh, coeffs, eps, matmul_dtype,
                                       rms_scale)
                outs.append(prev)
            return treedef.unflatten([o.astype(u.dtype) for o, (_, u) in zip(outs, flat, strict=True)]), state
        todo = []     # per leaf: (view, matrices [K, short, long], transposed, [*lead, n, m])
        outs = [None] * len(flat)
        for view, (_, u) in zip(leaf_views, flat, strict=True):
            y = view.to_matrices(u)
            tall = y.shape[-2] > y.shape[-1]
            if tall:
                y = jnp.swapaxes(y, -1, -2)
            todo.append((view, y.reshape(-1, *y.shape[-2:]), tall, y.shape))
        groups: dict = {}
        for i, item in enumerate(todo):
            groups.setdefault((item[1].shape[1:], item[1].dtype) if bucket else i, []).append(i)
        for members in groups.values():
            ys = [todo[i][1] for i in members]
            o = hybrid_newton_schulz(ys[0] if len(ys) == 1 else jnp.concatenate(ys), coeffs, eps, matmul_dtype)
            o = o * (rms_scale * math.sqrt(ys[0].shape[-1]))  # sqrt(max(n, m)): long side
            sizes = [y.shape[0] for y in ys]
            for i, part in zip(members, jnp.split(o, list(itertools.accumulate(sizes))[:-1]), strict=True):
                view, _, tall, shape = todo[i]
                part = part.reshape(shape)
                outs[i] = view.from_matrices(jnp.swapaxes(part, -1, -2) if tall else part)
        return treedef.unflatten([o.astype(u.dtype) for o, (_, u) in zip(outs, flat, strict=True)]), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_v4_muon(momentum: float = 0.95, coeffs=V4_NS_COEFFS, rms_scale: float = 0.18,
                     views: Views = None, eps: float = 1e-7, matmul_dtype=jnp.float32,
                     mu_dtype=None, bucket: bool = True, axes=None, balance: float = 1.08) -> optax.GradientTransformation:
    """DeepSeek-V4 Algorithm 1 without weight decay and learning rate (chain those after it):
    ``M <- mu M + G``; ``O = rms_scale sqrt(max(n, m)) HybridNS(mu M + G)`` per logical matrix.

    The momentum is ``optax.trace(mu, nesterov=True)``, which is exactly this sum form (not
    ``optax.contrib.scale_by_muon``'s bias-corrected EMA; see the module docstring). State:
    ``(TraceState(trace=M), EmptyState())``.
    """
    return optax.chain(optax.trace(momentum, nesterov=True, accumulator_dtype=mu_dtype),
                       orthogonalize_updates(views, coeffs, rms_scale, eps, matmul_dtype, bucket, axes, balance))


# ---------------------------------------------------------------------------------------------
# Which parameter goes where (by path, not by ndim)
# ---------------------------------------------------------------------------------------------


class UnknownParameterError(ValueError):
    """A parameter path that ``PARAM_RULES`` does not know (or matches twice), or a leaf whose shape does
    not fit its rule."""


class Rule(NamedTuple):
    pattern: str      # full-match regex on the "/"-joined parameter path
    label: str        # "muon" | "adamw"
    view: str | None  # Muon only: "matrix" (2-D), "stacked" ([B, n, m]: B independent), "fused" (compressor)


# a block: a layer of a scanned stack (leading [repeats] axis, v4jax.model.layout), a per-layer
# tree (checkpoint layout) or the MTP block
_B = r"(?:stack_\d+/layer_\d+|layers_\d+|mtp_\d+)/"
_STACKED = re.compile(r"stack_\d+/layer_\d+/")
_M = r"(?:mtp_\d+/)?"        # top level or inside an MTP block

PARAM_RULES: tuple[Rule, ...] = (
    # AdamW (V4 report 2.4 / 4.2.2): embedding, prediction head, RMSNorm weights, mHC static biases and gates
    Rule(r"embed/embedding", ADAMW, None),
    Rule(r"head/kernel", ADAMW, None),
    Rule(r"norm/scale", ADAMW, None),
    Rule(_B + r"(?:attn_norm|ffn_norm)/scale", ADAMW, None),
    Rule(r"mtp_\d+/(?:enorm|hnorm|norm)/scale", ADAMW, None),
    Rule(_B + r"attn/(?:q_norm|kv_norm)/scale", ADAMW, None),
    Rule(_B + r"attn/(?:indexer/)?compressor/norm/scale", ADAMW, None),
    Rule(_B + r"hc_(?:attn|ffn)/(?:base|scale)", ADAMW, None),
    Rule(_M + r"hc_head/(?:base|scale)", ADAMW, None),
    # AdamW, our choice (techniques 2.3): vectors with no rule in the report -- sinks, compressor position bias
    Rule(_B + r"attn/attn_sink", ADAMW, None),
    Rule(_B + r"attn/(?:indexer/)?compressor/ape", ADAMW, None),
    # Muon: every matrix, each logically independent matrix on its own
    Rule(_B + r"hc_(?:attn|ffn)/fn", MUON, "matrix"),
    Rule(_M + r"hc_head/fn", MUON, "matrix"),
    Rule(_B + r"attn/(?:wq_a|wq_b|wkv|wo_b)/kernel", MUON, "matrix"),
    Rule(_B + r"attn/wo_a", MUON, "stacked"),  # [g, n_h c / g, d_g]: g groups
    Rule(_B + r"attn/(?:indexer/)?compressor/(?:wkv|wgate)/kernel", MUON, "fused"),  # [d, (1+overlap) c]
    Rule(_B + r"attn/indexer/(?:wq_b|weights_proj)/kernel", MUON, "matrix"),
    Rule(_B + r"ffn/gate/kernel", MUON, "matrix"),  # router [d, E]
    Rule(_B + r"ffn/experts/(?:w1|w2|w3)", MUON, "stacked"),  # [E, in, out]: each routed expert
    Rule(_B + r"ffn/shared_experts/(?:w1|w2|w3)/kernel", MUON, "matrix"),
    Rule(r"mtp_\d+/(?:e_proj|h_proj)/kernel", MUON, "matrix"),
)


def param_rule(path: str) -> Rule:
    """The one rule of ``PARAM_RULES`` that matches ``path``; raises ``UnknownParameterError`` otherwise."""
    hits = [r for r in PARAM_RULES if re.fullmatch(r.pattern, path)]
    if not hits:
        hint = " (pass variables['params'], not the whole variables dict)" if path.startswith(
            ("params/", "buffers/")) else ""
        raise UnknownParameterError(f"no optimizer rule for parameter {path!r}{hint}: add it to "
                                    "v4jax.train.optimizer.PARAM_RULES so that it goes to Muon or AdamW on purpose")
    if len(hits) > 1:
        raise UnknownParameterError(f"parameter {path!r} matches several optimizer rules: "
                                    f"{[r.pattern for r in hits]}")
    return hits[0]


def param_labels(params):
    """Same tree as ``params`` with ``"muon"`` or ``"adamw"`` leaves, by parameter path (``PARAM_RULES``).
    Pass ``variables["params"]`` (buffers are not trained)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_rule(path_str(p)).label, params)


def matrix_views(params) -> dict[str, MatrixView]:
    """``{path: MatrixView}`` for every Muon leaf of ``params`` (arrays or ``ShapeDtypeStruct``s).

    A compressor's ``wkv``/``wgate`` ``[d, (1+overlap) c]`` is split into ``1+overlap`` column blocks,
    ``c`` read from its sibling ``norm/scale [c]`` (CSA and the indexer's compressor: 2 blocks; HCA: 1).
    A scanned stack's leaves (``stack_k/layer_j/...``) carry a leading layer axis: one more batch
    axis, so each layer's matrix is still orthogonalised on its own.
    """
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    views = {}
    for path, leaf in flat.items():
        rule = param_rule(path)
        if rule.label != MUON:
            continue
        lead = 1 if _STACKED.match(path) else 0
        if rule.view == "matrix":
            view = MatrixView(batch=lead)
        elif rule.view == "stacked":
            view = MatrixView(batch=1 + lead)
        else:  # "fused"
            norm_path = path.rsplit("/", 2)[0] + "/norm/scale"
            if norm_path not in flat:
                raise UnknownParameterError(f"{path}: cannot find {norm_path!r} to read the compressor width c")
            c = flat[norm_path].shape[-1]
            if leaf.shape[-1] % c or leaf.shape[-1] // c not in (1, 2):
                raise UnknownParameterError(f"{path}: width {leaf.shape[-1]} is not c or 2c for c = {c}")
            view = MatrixView(batch=lead, col_blocks=leaf.shape[-1] // c)
        view.check(leaf.shape, path)
        views[path] = view
    return views


# ---------------------------------------------------------------------------------------------
# Configuration, schedule, optimizer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerConfig:
    """V4 training optimizer settings (defaults: V4-Flash, spec section 9). Steps count optimizer updates.

    LR (``lr_schedule``): linear warm-up ``peak_lr * step / warmup_steps`` (so update 0 has LR 0 and only
    fills the moments), constant ``peak_lr`` until ``decay_start``, cosine decay to ``final_lr`` at
    ``total_steps``, constant ``final_lr`` after that. ``decay_start`` is also where V4 drops the MTP
    loss weight from 0.3 to 0.1.
    """

    total_steps: int
    decay_start: int
    peak_lr: float = 2.7e-4
    final_lr: float = 2.7e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.1           # decoupled, multiplied by the LR; Muon and AdamW
    muon_momentum: float = 0.95
    muon_rms: float = 0.18              # update RMS of every logical matrix
    muon_ns_coeffs: tuple[tuple[float, float, float], ...] = V4_NS_COEFFS
    muon_ns_dtype: str = "float32"      # NS matmul operands: "float32" or "bfloat16" (fp32 accumulation)
    muon_bucket: bool = True            # one batched NS per matrix shape (see orthogonalize_updates)
    muon_balance: float = 1.08          # on a mesh: NS FLOPs of the busiest device / (total / devices)
                                        # accepted before a leaf's long side is split (muon_layout)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-20
    clip: float | None = 1.0            # global-norm gradient clipping; None disables

    def __post_init__(self):
        def need(cond, fld: str, rule: str):
            if not cond:
                raise ConfigError(f"OptimizerConfig.{fld}: {rule} (got {getattr(self, fld)!r})")

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for f in ("total_steps", "decay_start", "warmup_steps"):
            need(is_int(getattr(self, f)) and getattr(self, f) >= 0, f, "must be an int >= 0")
        need(self.warmup_steps <= self.decay_start, "warmup_steps", "must be <= decay_start")
        need(self.decay_start <= self.total_steps, "decay_start", "must be <= total_steps")
        for f in ("peak_lr", "muon_rms"):
            need(is_num(getattr(self, f)) and getattr(self, f) > 0, f, "must be a finite number > 0")
        need(is_num(self.final_lr) and 0 <= self.final_lr <= self.peak_lr, "final_lr", "must be in [0, peak_lr]")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        for f in ("muon_momentum", "adam_b1", "adam_b2"):
            need(is_num(getattr(self, f)) and 0 <= getattr(self, f) < 1, f, "must be in [0, 1)")
        need(is_num(self.adam_eps) and self.adam_eps >= 0, "adam_eps", "must be >= 0")
        need(self.clip is None or (is_num(self.clip) and self.clip > 0), "clip", "must be None or > 0")
        need(isinstance(self.muon_bucket, bool), "muon_bucket", "must be a bool")
        need(is_num(self.muon_balance) and self.muon_balance >= 1, "muon_balance", "must be a number >= 1")
        need(self.muon_ns_dtype in ("float32", "bfloat16"), "muon_ns_dtype", "must be 'float32' or 'bfloat16'")
        rows = self.muon_ns_coeffs
        ok = isinstance(rows, (tuple, list)) and len(rows) > 0 and all(
            isinstance(r, (tuple, list)) and len(r) == 3 and all(is_num(v) for v in r) for r in rows)
        need(ok, "muon_ns_coeffs", "must be a non-empty sequence of (a, b, c) rows")
        object.__setattr__(self, "muon_ns_coeffs", tuple(tuple(float(v) for v in r) for r in rows))  # JSON lists

    @property
    def decay_steps(self) -> int:
        return self.total_steps - self.decay_start


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up -> constant ``peak_lr`` -> cosine decay from ``cfg.decay_start`` to ``final_lr``."""
    peak = cfg.peak_lr
    warm = (optax.linear_schedule(0.0, peak, cfg.warmup_steps) if cfg.warmup_steps
            else optax.constant_schedule(peak))
    decay = (optax.cosine_decay_schedule(peak, cfg.decay_steps, alpha=cfg.final_lr / peak) if cfg.decay_steps
             else optax.constant_schedule(cfg.final_lr))
    return optax.join_schedules([warm, optax.constant_schedule(peak), decay],
                                [cfg.warmup_steps, cfg.decay_start])


def make_optimizer(cfg: OptimizerConfig, params, axes=None) -> optax.GradientTransformation:
    """The V4 optimizer for ``params`` (the ``"params"`` collection; arrays or ``ShapeDtypeStruct``s,
    used for the labels and the logical-matrix views only). Raises for a parameter path with no rule.
    ``axes``: the parameters' logical axis names (``v4jax.parallel.placement.logical_specs``), which Muon
    uses under a mesh to keep expert matrices on their devices."""
    param_labels(params)  # fail now, not inside jit, on an unknown parameter
    if axes is not None:
        axes = {path_str(p): tuple(spec) for p, spec in jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    schedule = lr_schedule(cfg)
    muon = optax.chain(
        scale_by_v4_muon(cfg.muon_momentum, cfg.muon_ns_coeffs, cfg.muon_rms, views=matrix_views(params),
                         matmul_dtype=jnp.dtype(cfg.muon_ns_dtype), bucket=cfg.muon_bucket, axes=axes,
                         balance=cfg.muon_balance),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    adamw = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                        weight_decay=cfg.weight_decay)
    # identity() when clipping is off keeps the state's structure the same (both hold EmptyState)
    clip = optax.clip_by_global_norm(cfg.clip) if cfg.clip is not None else optax.identity()
    return optax.chain(clip, optax.multi_transform({MUON: muon, ADAMW: adamw}, param_labels))
