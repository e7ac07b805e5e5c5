"""Sharding as data: every parameter carries logical axis names (set where it is declared, see
``v4jax.layers.linear.param_with_axes``); this one rules table maps them onto mesh axes.

Nothing is sharded unless a mesh is given: on one device every spec resolves to replicated.
Mesh axes (``MESH_AXES``): ``data`` (batch), ``fsdp`` (batch, and parameters / optimizer state
sharded over ``embed``), ``expert`` (batch, and routed experts: expert parallel, see
``v4jax.moe.expert_parallel``), ``tensor`` (heads, MLP, vocabulary). ``v4jax.parallel.mesh`` builds
meshes, ``v4jax.parallel.placement`` the shardings of parameters and states from this table;
activations are constrained with the same names (``constrain``).

A leaf of the import graph: the rules, the active mesh and the mesh-shape helpers, nothing of the
model (so the model's layers can read the mesh without a cycle).
"""

from __future__ import annotations

import contextvars
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axis names, outermost first (``tensor`` innermost: its collectives are the most frequent).
MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")   # the axes the batch is split over

# logical axis -> mesh axis (or None = replicated). One table for the whole model, read as flax
# reads its rules (``nn.logical_to_mesh_axes``): in order, a rule places its logical axis on its
# mesh axes when that dim is still unplaced and those mesh axes are not used by another dim of
# the same leaf. A logical axis may have several rules: the later ones are fallbacks, so every
# large matrix is split on any mesh (#21): a dense leaf's ``embed`` goes over ``fsdp`` x
# ``expert`` (both only split the batch for it), an expert leaf's over ``fsdp`` (``expert`` holds
# its experts); the low-rank dims (``q_lora``, ``o_lora``, ``kv``) take the batch axes when the
# leaf's other dim is on ``tensor`` or absent, and ``tensor`` when the other dim holds the batch axes.
# ``to_mesh_spec`` also skips a rule whose mesh axes do not divide the dim (the next one applies).
_ZERO = ("fsdp", "expert")       # the axes a dense parameter is split over (ZeRO-3 over the batch)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations (``constrain``)
    ("batch", BATCH_AXES),
    ("act_seq", None),
    ("act_hc", None),
    ("act_embed", None),
    # parameters: first choices
    ("layers", None),          # the stacked layer axis of a scanned stack (v4jax.model.layout)
    ("experts", "expert"),     # before "embed": an expert leaf keeps "expert" for its experts
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("index_heads", "tensor"),
    ("o_groups", "tensor"),
    ("mlp", "tensor"),
    ("embed", _ZERO),
    ("embed", "fsdp"),
    ("hc_embed", _ZERO),
    ("hc_embed", "fsdp"),
    # fallbacks: the other dim of a low-rank or grouped matrix
    ("q_lora", _ZERO),
    ("q_lora", "fsdp"),
    ("q_lora", "tensor"),
    ("o_lora", _ZERO),
    ("o_lora", "fsdp"),
    ("o_lora", "tensor"),
    ("kv", _ZERO),
    ("kv", "fsdp"),
    ("kv", "tensor"),
    # NOT ("embed", "tensor"): a dense leaf's contracted ``embed`` on ``tensor`` next to the grouped
    # output's ``o_groups`` on ``tensor`` makes XLA's SPMD partitioner (jax 0.12, Shardy and
    # GSPMD) emit a collective-permute of the batch blocks that it never undoes: wrong values, not
    # an error (experiments/repro/spmd_batch_permute.py; found by test_parallel on
    # data=2,expert=2,tensor=2). The router is split on its ``experts`` dim instead (below).
    ("hc_embed", "tensor"),
    ("experts", "tensor"),     # the router [embed, experts] on a mesh without ``expert`` (last:
                               # an expert leaf's ``mlp`` has taken ``tensor`` before)
    ("embed_out", "tensor"),   # MTP's e_proj / h_proj [embed, embed_out]: column-parallel on tensor
    ("heads_only", None),
    ("hc", None),
    ("norm", None),
)

LOGICAL_AXES = tuple(dict.fromkeys(name for name, _ in RULES))

# the residual streams [B, T, hc, d] at every layer boundary
STREAM_AXES = ("batch", "act_seq", "act_hc", "act_embed")


def mesh_axes_of(entry) -> tuple[str, ...]:
    """The mesh axes of a rule's or a ``PartitionSpec``'s entry (None, a name, or names) as a tuple."""
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def rules_for(mesh: Mesh | None, rules=RULES):
    """``rules`` on ``mesh``: mesh axes it lacks (or has with size 1) removed from each rule, and a
    rule left with none dropped (so a later fallback for the same logical axis can apply); a rule
    that says ``None`` (replicated) stays."""
    present = set() if mesh is None else {a for a, n in mesh.shape.items() if n > 1}
    out = []
    for name, axis in rules:
        if axis is None:
            out.append((name, None))
            continue
        kept = tuple(a for a in mesh_axes_of(axis) if a in present)
        if kept:
            out.append((name, kept[0] if len(kept) == 1 else kept))
    return tuple(out)


def resolve(logical, rules, mesh_shape, shape=None) -> PartitionSpec:
    """flax's rule resolution (``nn.logical_to_mesh_axes``: the same result when ``shape`` is None;
    tested against it) with one addition flax cannot make, because it never sees the array: with
    ``shape``, a rule whose mesh axes (product of sizes) do not divide the dim is skipped, so a
    fallback rule or replication applies instead of a sharding that cannot be laid out."""
    logical = tuple(logical)
    names = [n for n in logical if isinstance(n, str)]
    if len(names) != len(set(names)):
        raise ValueError(f"logical axes {logical} name a dimension twice")
    unset = object()
    out = [unset if isinstance(n, str) else n for n in logical]
    used: set = set()
    for name, axis in rules:
        if name not in logical:
            continue
        pos = logical.index(name)
        if out[pos] is not unset:
            continue
        axes = mesh_axes_of(axis)
        if used.intersection(axes):
            continue
        if shape is not None and axes and shape[pos] % math.prod(int(mesh_shape[a]) for a in axes):
            continue
        out[pos] = axis
        used.update(axes)
    return PartitionSpec(*(None if x is unset else x for x in out))


def to_mesh_spec(logical: tuple | PartitionSpec, mesh: Mesh, rules=RULES, shape=None) -> PartitionSpec:
    """A logical spec -> the ``PartitionSpec`` over ``mesh``'s axes; with ``shape`` (the array's),
    only mesh axes that divide their dim (see ``resolve``)."""
    return resolve(logical, rules_for(mesh, rules), mesh.shape, shape)


def axis_size(mesh: Mesh | None, name: str) -> int:
    return 1 if mesh is None else int(mesh.shape.get(name, 1))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (size > 1) a batch is split over."""
    return tuple(a for a in BATCH_AXES if axis_size(mesh, a) > 1)


def batch_shards(mesh: Mesh | None) -> int:
    return 1 if mesh is None else math.prod(axis_size(mesh, a) for a in batch_axes(mesh))


_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("v4jax_mesh", default=None)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing ``v4jax.parallel.mesh_context`` (None outside one)."""
    return _ACTIVE.get()


def constrain(x, logical_axes: tuple):
    """``x`` constrained to the sharding its logical axes give under the active mesh
    (``v4jax.parallel.mesh_context``); the identity when no mesh is active. (Not flax's
    ``with_logical_constraint``: its rules live in a context of their own that jit's cache does
    not see; here the mesh and this table are the whole input.)"""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, to_mesh_spec(logical_axes, mesh, shape=x.shape)))
