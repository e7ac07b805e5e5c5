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

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axis names, outermost first (``tensor`` innermost: its collectives are the most frequent).
MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")   # the axes the batch is split over

# logical axis -> mesh axis (or None = replicated). One table for the whole model.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations (``constrain``)
    ("batch", BATCH_AXES),
    ("act_seq", None),
    ("act_hc", None),
    ("act_embed", None),
    # parameters
    ("layers", None),          # the stacked layer axis of a scanned stack (v4jax.model.layout)
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("q_lora", None),
    ("heads", "tensor"),
    ("heads_only", None),
    ("index_heads", "tensor"),
    ("kv", None),
    ("o_groups", "tensor"),
    ("o_lora", None),
    ("experts", "expert"),
    ("mlp", "tensor"),
    ("hc", None),
    ("hc_embed", "fsdp"),
    ("norm", None),
)

LOGICAL_AXES = tuple(name for name, _ in RULES)

# the residual streams [B, T, hc, d] at every layer boundary
STREAM_AXES = ("batch", "act_seq", "act_hc", "act_embed")


def rules_for(mesh: Mesh | None, rules=RULES):
    """``rules`` with the mesh axes that ``mesh`` lacks (or has with size 1) dropped."""
    present = set() if mesh is None else {a for a, n in mesh.shape.items() if n > 1}

    def keep(axis):
        if axis is None:
            return None
        if isinstance(axis, tuple):
            kept = tuple(a for a in axis if a in present)
            return kept or None
        return axis if axis in present else None

    return tuple((k, keep(v)) for k, v in rules)


def to_mesh_spec(logical: tuple | PartitionSpec, mesh: Mesh, rules=RULES) -> PartitionSpec:
    """A logical spec -> the ``PartitionSpec`` over ``mesh``'s axes."""
    return nn.logical_to_mesh_axes(tuple(logical), rules_for(mesh, rules))


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
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, to_mesh_spec(logical_axes, mesh)))
