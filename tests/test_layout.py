"""The scanned layer stack (v4jax/model/layout.py), runtime options and module boundaries."""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables, small_config

import v4jax
from v4jax.config import ConfigError, preset
from v4jax.model.layout import Stack, layer_plan, layer_tree, locate, plan_kinds, stack_layers, unstack_variables
from v4jax.params import abstract_variables
from v4jax.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flash_and_pro_schedules_become_three_stacks():
    flash, pro = layer_plan(preset("flash")), layer_plan(preset("pro"))
    assert flash == (Stack(0, (("window", True),), 2), Stack(2, (("csa", True),), 1),
                     Stack(3, (("hca", False), ("csa", False)), 20))
    assert pro == (Stack(0, (("hca", True),), 2), Stack(2, (("csa", True),), 1),
                   Stack(3, (("hca", False), ("csa", False)), 29))
    for cfg in (preset("flash"), preset("pro"), preset("tiny"), preset("small")):
        plan = layer_plan(cfg)
        covered = [st.layer_index(r, j) for st in plan for r in range(st.repeats) for j in range(len(st.pattern))]
        assert covered == list(range(cfg.n_layers))
        for i in range(cfg.n_layers):   # every layer's kind is its stack's pattern entry
            k, r, j = locate(cfg, i)
            assert plan[k].pattern[j] == (cfg.layer_types[i], cfg.is_hash_layer(i))


def test_plan_prefers_longest_cover():
    a, b = ("csa", False), ("hca", False)
    assert plan_kinds((a, a, a)) == (Stack(0, (a,), 3),)
    assert plan_kinds((a, b, a, b, a)) == (Stack(0, (a, b), 2), Stack(4, (a,), 1))
    assert plan_kinds((a,)) == (Stack(0, (a,), 1),)


def test_stacked_parameters_have_the_layers_axis_name():
    from v4jax.parallel.placement import logical_specs
    from v4jax.sharding import RULES

    cfg = preset("tiny")
    specs = logical_specs(cfg)
    assert tuple(specs["stack_2"]["layer_1"]["ffn"]["experts"]["w1"]) == ("layers", "experts", "embed", "mlp")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert "layers" in dict(RULES)
    shapes = abstract_variables(cfg)["params"]
    assert shapes["stack_2"]["layer_0"]["attn"]["wq_a"]["kernel"].shape == (2, 256, 128)   # (HCA, CSA) x 2


def test_stack_unstack_round_trip_is_bitwise():
    cfg = small_config(n_layers=6, layer_types=("window", "csa", "hca", "csa", "hca", "csa"), n_hash_layers=1)
    v = random_variables(cfg, seed=4)
    canon = unstack_variables(cfg, v)
    assert set(canon["params"]) >= {f"layers_{i}" for i in range(6)} and not any(k.startswith("stack_") for k in canon["params"])
    back = {c: stack_layers(cfg, t) for c, t in canon.items()}
    la, lb = jax.tree_util.tree_flatten_with_path(v)[0], jax.tree_util.tree_flatten_with_path(back)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, a), (_, b) in zip(la, lb):
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)), jax.tree_util.keystr(p)
    for i in range(6):
        jax.tree.map(np.testing.assert_array_equal, layer_tree(cfg, v["params"], i), canon["params"][f"layers_{i}"])
    with pytest.raises(KeyError, match="layers_3"):
        stack_layers(cfg, {k: t for k, t in canon["params"].items() if k != "layers_3"})


def test_scanned_model_equals_per_layer_loop():
    """The scanned stacks compute what an explicit loop over the per-layer parameters computes."""
    from v4jax.attention.context import SeqContext
    from v4jax.model.block import Block

    cfg = small_config(n_layers=5, layer_types=("window", "csa", "hca", "csa", "hca"), n_hash_layers=1,
                       n_mtp_layers=0)
    v = random_variables(cfg, seed=5)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 21)), jnp.int32)
    m = v4jax.V4Model(cfg, v)
    out = m.forward(ids, with_mtp=False)
    canon = unstack_variables(cfg, v)
    emb = canon["params"]["embed"]["embedding"][ids]
    x = jnp.repeat(emb[:, :, None, :], cfg.hc_mult, axis=2)
    for i in range(cfg.n_layers):
        blk = Block(cfg, cfg.layer_types[i], cfg.is_hash_layer(i))
        lv = {"params": canon["params"][f"layers_{i}"], "buffers": canon["buffers"].get(f"layers_{i}", {})}
        x, st, _ = blk.apply(lv, x, ids, SeqContext())
        np.testing.assert_allclose(np.asarray(st["load"]), np.asarray(out["moe"][i]["load"]))
    np.testing.assert_allclose(np.asarray(x), np.asarray(out["hidden"]), rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _remat_grads(policy: str):
    from v4jax.model.transformer import Transformer

    cfg = small_config(n_layers=3, layer_types=("window", "csa", "csa"), n_hash_layers=1, n_mtp_layers=0)
    v = random_variables(cfg, seed=6)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 24)), jnp.int32)
    m = Transformer(cfg, Runtime(remat=policy))
    f = lambda p: jnp.sum(m.apply({"params": p, "buffers": v["buffers"]}, ids)["logits"] ** 2) * 1e-3
    return jax.device_get(jax.jit(jax.value_and_grad(f))(v["params"]))


@pytest.mark.parametrize("policy", ["full", "save_matmuls", pytest.param("offload", marks=pytest.mark.slow)])
def test_remat_policies_leave_values_and_grads_unchanged(policy):
    (a, ga), (b, gb) = _remat_grads("none"), _remat_grads(policy)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        # recomputation reorders fp32 sums: within 5e-4 of each leaf's largest gradient
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=5e-4 * float(jnp.abs(x).max()) + 1e-9)


def test_runtime_options_are_not_architecture():
    with pytest.raises(ConfigError, match="runtime options"):
        preset("tiny", attention_impl="pallas")
    with pytest.raises(ConfigError, match="runtime options"):
        preset("tiny").replace(moe_impl="dense")
    with pytest.raises(ValueError, match="Runtime.attention"):
        Runtime(attention="flash")
    assert Runtime.from_dict({"attention_impl": "pallas", "moe_impl": "dense"}) == Runtime("pallas", "dense")
    m = v4jax.V4Model(small_config(), random_variables(small_config()), attention="reference")
    assert m.runtime.attention == "reference" and m.with_runtime(moe="dense").runtime == Runtime("reference", "dense")


def test_old_train_config_json_moves_impl_fields_to_runtime():
    from v4jax.train.config import TrainConfig, train_preset

    d = train_preset("tiny").to_dict()
    del d["runtime"]
    d["model"].update(attention_impl="reference", moe_impl="dense", dense_compressed_attention=False)
    cfg = TrainConfig.from_dict(d)
    assert cfg.runtime == Runtime(attention="reference", moe="dense")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert train_preset("tiny").override(["runtime.attention=pallas"]).runtime.attention == "pallas"


def test_module_boundaries():
    """The model does not import v4jax.inference; only the attention backend imports kernels_pallas
    (at module level since issue #23: no imports inside functions; it costs ~50 ms once jax is in)."""
    src = os.path.join(ROOT, "v4jax")
    importers = []
    for dirpath, _, files in os.walk(src):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                text = open(path).read()
                rel = os.path.relpath(path, ROOT)
                if re.search(r"^\s*(import|from)\s+kernels_pallas", text, re.M):
                    importers.append(rel)
                if rel.startswith(("v4jax/model", "v4jax/attention", "v4jax/moe", "v4jax/layers")):
                    assert not re.search(r"v4jax\.inference", text), rel
    assert importers == [os.path.join("v4jax", "attention", "backend.py")], importers


def test_per_layer_orbax_workdir_loads_and_refuses_to_resume(tmp_path):
    """Workdirs written before the layer scan hold ``layers_{i}`` trees: their weights load (stacked on
    the way in), resuming their optimizer state fails with a message that says what to do."""
    import orbax.checkpoint as ocp

    from v4jax.checkpoint import CheckpointLayoutError, load_workdir
    from v4jax.train.loop import checkpoint_manager, restore_checkpoint

    cfg = small_config()
    v = random_variables(cfg, seed=7)
    wd = str(tmp_path / "old")
    mngr = ocp.CheckpointManager(wd, options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(unstack_variables(cfg, v)),
                                         config=ocp.args.JsonSave(cfg.to_hf_dict())))
    mngr.wait_until_finished()
    mngr.close()
    m = load_workdir(wd)
    ids = np.random.default_rng(3).integers(0, 256, (1, 19)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(m(ids)), np.asarray(v4jax.V4Model(cfg, v)(ids)))
    with pytest.raises(CheckpointLayoutError, match="load_workdir"):
        restore_checkpoint(checkpoint_manager(wd), 3, None, None)


def test_unrolled_stacks_equal_scanned_stacks():
    """``Runtime.unroll`` (shallow stacks without a loop) changes nothing but speed: the same
    logits and the same gradients as scanning every stack."""
    cfg = small_config()
    variables = random_variables(cfg, seed=3)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    outs = []
    for unroll in (0, 64):
        m = v4jax.V4Model(cfg, variables, unroll=unroll)

        def loss(p, variables, m=m):   # the logits ride along as aux: one compile gives both
            logits = m.module.apply({**variables, "params": p}, jnp.asarray(ids))["logits"]
            return jnp.mean(logits ** 2), logits
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(m.params, m.variables)
        outs.append((np.asarray(logits), grads))
    (la, ga), (lb, gb) = outs
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5 * np.abs(la).max())
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-12)
