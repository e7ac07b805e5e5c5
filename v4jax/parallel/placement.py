"""Where every leaf a step touches lives on a mesh: parameters by the rules table
(``v4jax.sharding.RULES``) through their logical axis names, optimizer-state leaves that mirror a
parameter (momenta, Adam moments) with that parameter's sharding, buffers (router biases, hash
tables) and scalars replicated, decode caches split over the batch axes.

Above the model in the import graph (it reads the model's abstract variables,
``v4jax.params.abstract_variables``); ``v4jax.sharding`` (the rules) and ``v4jax.parallel.mesh``
(building meshes) sit below it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from v4jax.config import V4Config
from v4jax.layers.quantized import QuantizedWeight, is_quantized
from v4jax.parallel.mesh import replicated
from v4jax.params import abstract_variables
from v4jax.sharding import RULES, batch_axes, batch_shards, to_mesh_spec


def logical_specs(cfg: V4Config):
    """The logical ``PartitionSpec`` of every parameter (a pytree like ``params``)."""
    boxed = abstract_variables(cfg, boxed=True)
    return nn.get_partition_spec(boxed)["params"]


def mesh_shardings(cfg: V4Config, mesh: Mesh, rules=RULES):
    """``NamedSharding`` per parameter for ``mesh``: its logical axes through the rules, mesh axes
    absent from the mesh dropped, and only mesh axes that divide their dim (else the next rule)."""
    specs = logical_specs(cfg)
    shapes = abstract_variables(cfg)["params"]
    to_mesh = lambda spec, x: NamedSharding(mesh, to_mesh_spec(spec, mesh, rules, shape=x.shape))
    return jax.tree.map(to_mesh, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def quantized_sharding(q: QuantizedWeight, sharding: NamedSharding) -> QuantizedWeight:
    """The shardings of a native weight's codes and scales, from the sharding of the dense leaf it
    stands for (v4jax's layout): the checkpoint layout's axes in their order (``"t"``: the last
    two swapped; ``"wo_a"``: ``[g, in, d_g]`` -> ``[g*d_g, in]`` split like ``g``), and a scale
    axis split only where its number of blocks divides the shards (a scale shards with its
    blocks; scales are 1/1024 of FP8 codes, 1/16 of FP4's, so replicating an odd one costs little)."""
    spec = tuple(sharding.spec) + (None,) * (len(q.shape) - len(sharding.spec))
    if q.layout == "t":
        cspec = spec[:-2] + (spec[-1], spec[-2])
    else:   # wo_a: [..., g, in, dg] -> [..., g*dg, in]: g*dg split over g's mesh axes, then dg's (g-major)
        axes = tuple(a for e in (spec[-3], spec[-1]) if e is not None for a in ((e,) if isinstance(e, str) else e))
        cspec = spec[:-3] + ((axes[0] if len(axes) == 1 else axes) if axes else None, spec[-2])
    size = lambda entry: int(np.prod([sharding.mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry)]))
    sspec = tuple(e if e is None or n % size(e) == 0 else None for e, n in zip(cspec, q.scale.shape))
    named = lambda sp: NamedSharding(sharding.mesh, P(*sp))
    return q.replace(codes=named(cspec), scale=named(sspec))


def variables_shardings(cfg, mesh: Mesh, variables_like) -> dict:
    """Shardings for ``{"params", "buffers"}``: parameters by the rules table, buffers replicated.
    Native (quantized) weights among ``variables_like["params"]`` get ``quantized_sharding``."""
    params = mesh_shardings(cfg, mesh)
    if "params" in variables_like:
        params = jax.tree.map(lambda v, sh: quantized_sharding(v, sh) if is_quantized(v) else sh,
                              variables_like["params"], params, is_leaf=is_quantized)
    out = {"params": params}
    if "buffers" in variables_like:
        out["buffers"] = jax.tree.map(lambda _: replicated(mesh), variables_like["buffers"])
    return out


def _key_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def mirror_shardings(tree_like, params_like, param_shardings, mesh: Mesh):
    """Shardings for a tree whose leaves may mirror parameters (optimizer state): a leaf whose
    key path ends with a parameter's path and has its shape gets that parameter's sharding;
    every other leaf (counters, empty states) is replicated."""
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params_like)[0]:
        by_path[_key_names(path)] = (tuple(leaf.shape), None)
    sh = {}
    for path, s in jax.tree_util.tree_flatten_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]:
        sh[_key_names(path)] = s
    for k in by_path:
        by_path[k] = (by_path[k][0], sh[k])
    depth = max((len(k) for k in by_path), default=0)

    def pick(path, leaf):
        names = _key_names(path)
        for n in range(min(depth, len(names)), 0, -1):
            hit = by_path.get(names[-n:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree_like)


def state_shardings(cfg, mesh: Mesh, state_like) -> dict:
    """Shardings of a train state ``{"step", "params", "buffers", "opt_state", "rng"}``."""
    v = variables_shardings(cfg, mesh, state_like)
    return {"step": replicated(mesh), "params": v["params"],
            "buffers": v.get("buffers", jax.tree.map(lambda _: replicated(mesh), state_like["buffers"])),
            "opt_state": mirror_shardings(state_like["opt_state"], state_like["params"], v["params"], mesh),
            "rng": replicated(mesh)}


def cache_shardings(mesh: Mesh, cache: dict):
    """Shardings of a decode cache (``v4jax.model.transformer.init_cache``): ``pos [B]`` and the
    per-layer leaves ``[repeats, B, ...]`` split over the batch axes when B divides evenly,
    everything else replicated."""
    B = cache["pos"].shape[0]
    axes = batch_axes(mesh) if B % batch_shards(mesh) == 0 else ()
    spec = axes if axes else None
    layers = jax.tree.map(lambda a: NamedSharding(mesh, P(None, spec) if a.ndim >= 2 else P()), cache["layers"])
    out = {k: replicated(mesh) for k in cache}
    out.update(pos=NamedSharding(mesh, P(spec)), layers=layers)
    return out


__all__ = ["logical_specs", "mesh_shardings", "variables_shardings", "mirror_shardings", "state_shardings",
           "cache_shardings"]
