"""Sharding as data: every parameter carries logical axis names (set where it is declared, see
``v4jax.layers.linear.param_with_axes``); this one rules table maps them onto mesh axes.

Nothing is sharded unless a mesh is given: on one device every spec resolves to replicated.
Mesh axes: ``data`` (batch), ``fsdp`` (parameter sharding), ``tensor`` (heads / mlp / vocab),
``expert`` (expert parallel).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from v4jax.config import V4Config

# logical axis -> mesh axis (or None = replicated). One table for the whole model.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
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


def logical_specs(cfg: V4Config):
    """The logical ``PartitionSpec`` of every parameter (a pytree like ``params``)."""
    from v4jax.params import abstract_variables

    boxed = abstract_variables(cfg, boxed=True)
    return nn.get_partition_spec(boxed)["params"]


def mesh_shardings(cfg: V4Config, mesh: Mesh, rules=RULES):
    """``NamedSharding`` per parameter for ``mesh``; mesh axes absent from the mesh are dropped."""
    present = set(mesh.axis_names)

    def keep(axis):
        if axis is None:
            return None
        if isinstance(axis, tuple):
            kept = tuple(a for a in axis if a in present)
            return kept or None
        return axis if axis in present else None

    rules = tuple((k, keep(v)) for k, v in rules)
    specs = logical_specs(cfg)
    to_mesh = lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules))
    return jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
