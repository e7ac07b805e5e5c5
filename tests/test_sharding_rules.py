"""The rules table (``v4jax.sharding``): the resolution equals flax's ``logical_to_mesh_axes``
(the oracle) where shapes do not matter, skips mesh axes that do not divide a dim, and leaves no
large parameter of the real presets replicated on a mesh of 8 or more devices (#21)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import v4jax.parallel.plan as plan_mod
from v4jax.parallel.placement import logical_specs
from v4jax.parallel.plan import REPLICATED_REPORT_BYTES, abstract_mesh
from v4jax.params import abstract_variables
from v4jax.sharding import LOGICAL_AXES, RULES, resolve, rules_for, to_mesh_spec
from v4jax.train.config import train_preset

_sizes = st.sampled_from([1, 2, 4])


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.sampled_from(LOGICAL_AXES + (None,)), min_size=1, max_size=4),
       data=_sizes, fsdp=_sizes, expert=_sizes, tensor=_sizes)
def test_resolution_equals_flax_without_shapes(names, data, fsdp, expert, tensor):
    strs = [n for n in names if n is not None]
    if len(strs) != len(set(strs)):
        names = list(dict.fromkeys(strs))
    mesh = abstract_mesh({"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor})
    rules = rules_for(mesh)
    assert resolve(tuple(names), rules, mesh.shape) == nn.logical_to_mesh_axes(tuple(names), rules)


def test_rules_for_drops_absent_axes_so_fallbacks_apply():
    mesh = abstract_mesh({"fsdp": 4})
    rules = dict.fromkeys(n for n, _ in RULES)
    assert all(n in rules for n in ("q_lora", "o_lora", "kv"))
    # wq_b [q_lora, heads]: no tensor axis, so q_lora takes fsdp (it was replicated before #21)
    assert to_mesh_spec(("q_lora", "heads"), mesh) == P("fsdp", None)
    both = abstract_mesh({"fsdp": 4, "expert": 2, "tensor": 2})
    assert to_mesh_spec(("q_lora", "heads"), both) == P(("fsdp", "expert"), "tensor")
    # an expert leaf keeps expert for its experts; its embed takes fsdp alone
    assert to_mesh_spec(("experts", "embed", "mlp"), both) == P("expert", "fsdp", "tensor")
    # a dense leaf: embed over fsdp x expert, its other dim over tensor
    assert to_mesh_spec(("embed", "kv"), both) == P(("fsdp", "expert"), "tensor")
    assert to_mesh_spec(("embed", "kv"), abstract_mesh({"tensor": 8})) == P(None, "tensor")
    assert to_mesh_spec(("norm",), both) == P(None)
    # the router [embed, experts]: experts on expert, embed on fsdp; on a tensor-only mesh its
    # experts on tensor, never its contracted embed (see the next test)
    assert to_mesh_spec(("embed", "experts"), both) == P("fsdp", "expert")
    assert to_mesh_spec(("embed", "experts"), abstract_mesh({"tensor": 8})) == P(None, "tensor")


def test_no_rule_puts_embed_on_tensor():
    """A dense leaf's embed on tensor made XLA's SPMD partitioner permute batch blocks (wrong
    values on data=2,expert=2,tensor=2; experiments/repro/spmd_batch_permute.py)."""
    assert ("embed", "tensor") not in RULES
    for mesh in ({"tensor": 8}, {"data": 2, "expert": 2, "tensor": 2}, {"fsdp": 2, "tensor": 4}):
        m = abstract_mesh(mesh)
        for axes in (("embed", "kv"), ("embed", "q_lora"), ("o_lora", "embed"), ("embed", "experts"), ("embed",)):
            spec = to_mesh_spec(axes, m)
            assert spec[axes.index("embed")] in (None, "fsdp", "expert", ("fsdp", "expert")), (mesh, axes, spec)


@pytest.mark.parametrize("size, want", [(16, ("fsdp", "expert")), (6, "fsdp"), (3, None)])
def test_a_rule_that_does_not_divide_gives_way_to_the_next(size, want):
    mesh = abstract_mesh({"fsdp": 2, "expert": 4})
    assert to_mesh_spec(("embed", "norm"), mesh, shape=(size, 5)) == P(want, None)
    # without the shape: flax's answer, whatever the size
    assert to_mesh_spec(("embed", "norm"), mesh) == P(("fsdp", "expert"), None)


def test_duplicate_logical_axis_is_an_error():
    with pytest.raises(ValueError, match="twice"):
        resolve(("embed", "embed"), RULES, {})


@functools.cache
def _abstract(preset: str):
    """(abstract params, their logical specs) of a preset, once per test process."""
    cfg = train_preset(preset).model
    return abstract_variables(cfg)["params"], logical_specs(cfg)


@pytest.mark.parametrize("preset, mesh", [
    ("flash", {"fsdp": 8}), ("flash", {"expert": 8}), ("flash", {"tensor": 8}),
    ("flash", {"fsdp": 32, "expert": 8}), ("pro", {"fsdp": 4, "expert": 2, "tensor": 2}),
])
def test_no_large_parameter_is_replicated_on_8_or_more_devices(preset, mesh):
    params, logical = _abstract(preset)
    am = abstract_mesh(mesh)
    replicated, _ = plan_mod._unsplit_params(params, logical, am)     # what v4jax-plan reports
    assert replicated == [], [(x["path"], x["shape"]) for x in replicated]
    # and a direct check: every leaf above 16 MiB is split over at least 2 devices
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
    assert len(flat) == len(specs)
    for (path, leaf), lg in zip(flat, specs, strict=True):
        if leaf.size * leaf.dtype.itemsize > REPLICATED_REPORT_BYTES:
            spec = to_mesh_spec(tuple(lg), am, shape=leaf.shape)
            assert math.prod(plan_mod.dim_shards(spec, leaf.ndim, am.shape)) > 1, (jax.tree_util.keystr(path), spec)
