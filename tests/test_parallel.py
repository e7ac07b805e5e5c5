"""Meshes on 8 simulated CPU devices (tests/conftest.py sets ``jax_num_cpu_devices``): one device
is the reference for every sharded computation (loss, gradients, optimizer update, training run,
checkpoint restored onto another mesh, expert-parallel dispatch, generation)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import N_DEVICES, random_variables, small_config
from jax.sharding import PartitionSpec as P

from v4jax.config import ConfigError
from v4jax.parallel.mesh import (
    batch_sharding,
    make_mesh,
    mesh_context,
    parse_mesh,
    put_batch,
)
from v4jax.parallel.placement import variables_shardings

MESHES = ["data=8", "fsdp=8", "fsdp=2,expert=4", "data=2,fsdp=2,expert=2", "data=2,expert=2,tensor=2"]

pytestmark = pytest.mark.skipif(jax.device_count() < N_DEVICES, reason="needs the 8 simulated CPU devices")


def tiny_cfg(**kw):
    """Every layer type (window, CSA, HCA), a hash layer, learned routing, MTP; small enough to
    compile in seconds. Vocabulary 320 fits the byte tokenizer (259 ids) for the training runs."""
    base = dict(n_layers=3, layer_types=("window", "csa", "hca"), n_hash_layers=1, n_mtp_layers=1, max_seq_len=64,
                dim=32, n_heads=2, head_dim=16, q_lora_rank=16, o_lora_rank=8, index_n_heads=4, index_head_dim=8,
                moe_inter_dim=16, vocab_size=320)
    base.update(kw)
    return small_config(**base)


def run_cfg(model, **kw):
    from v4jax.train.config import train_preset

    tc = train_preset("tiny", ["batch_size=8", "seq_len=16", "tokenizer=byte"])
    return dataclasses.replace(tc, model=model, **kw)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(a.ravel()), 1e-30))


def test_parse_mesh_and_its_errors():
    assert parse_mesh("expert=2, data=4") == {"expert": 2, "data": 4}
    mesh = make_mesh("tensor=2,data=2,fsdp=2")
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == 8      # canonical order
    for bad, msg in [("model=8", "'model' is not one of"), ("data=2,data=4", "given twice"),
                     ("data=0", "positive integer"), ("data=x", "positive integer"), ("data", "not axis=size"),
                     ("", "empty")]:
        with pytest.raises(ConfigError, match=msg):
            parse_mesh(bad)
    with pytest.raises(ConfigError, match="has 3 devices but 8 are present"):
        make_mesh("data=3")
    with pytest.raises(ConfigError, match="batch_size 6 is not divisible by the 8 batch shards"):
        batch_sharding(make_mesh("data=2,fsdp=2,expert=2"), 6)


def test_cli_rejects_a_mesh_that_does_not_fit(tmp_path, capsys):
    from v4jax.train.cli import train_main

    assert train_main(["--config", "tiny", "--workdir", str(tmp_path / "run"), "--mesh", "data=3", "--no-progress"]) == 2
    assert "has 3 devices but 8 are present" in capsys.readouterr().err
    assert train_main(["--config", "tiny", "--workdir", str(tmp_path / "run"), "--mesh", "pipe=8"]) == 2
    assert "'pipe' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()                                        # nothing written


def test_state_is_created_sharded_with_the_one_device_values():
    from v4jax.parallel.placement import logical_specs
    from v4jax.params import abstract_variables
    from v4jax.train.optimizer import make_optimizer
    from v4jax.train.step import init_state

    tc = run_cfg(tiny_cfg())
    tx = make_optimizer(tc.optim, abstract_variables(tc.model)["params"], logical_specs(tc.model))
    mesh = make_mesh("fsdp=2,expert=4")
    st = init_state(tc, tx, mesh=mesh)
    ref = init_state(tc, tx)
    w1 = st["params"]["stack_1"]["layer_0"]["ffn"]["experts"]["w1"]        # [1, E=8, d=32, I=16]
    assert w1.sharding.spec == P(None, "expert", "fsdp", None)
    assert w1.addressable_shards[0].data.shape == (1, 2, 16, 16)
    mom = st["opt_state"][1].inner_states["muon"].inner_state[0][0].trace["stack_1"]["layer_0"]["ffn"]["experts"]["w1"]
    assert mom.sharding.spec == w1.sharding.spec                                # momentum sharded like its parameter
    emb = st["params"]["embed"]["embedding"]
    # a dense leaf's embed dim over fsdp x expert (#21: expert only splits the batch for it)
    assert emb.sharding.spec == P(None, ("fsdp", "expert")) and emb.addressable_shards[0].data.shape == (320, 4)
    # the same random draws; the sharded init is another compiled program (shard-width loops), and
    # on some CPUs (an AMD EPYC VM, 2026-12-07) a few fan-in-16 leaves come out up to 1 ulp apart
    for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(st["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=4e-7, atol=1e-9)


@pytest.fixture(scope="module")
def grad_case():
    from v4jax.train.step import _forward_losses

    cfg = tiny_cfg()
    tc = run_cfg(cfg)
    v = random_variables(cfg, 3)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (8, 17)).astype(np.int32),
             "segment_ids": np.repeat([[1] * 9 + [2] * 8], 8, 0).astype(np.int32)}
    f = lambda p, b, bt: jax.value_and_grad(lambda p: _forward_losses(tc, 2, p, b, bt, jnp.int32(0))[0])(p)
    loss, grads = jax.jit(f)(v["params"], v["buffers"], put_batch(batch, None))
    return cfg, v, batch, f, float(loss), jax.device_get(grads)


@pytest.mark.parametrize("spec", MESHES)
def test_loss_and_gradients_on_a_mesh_equal_one_device(grad_case, spec):
    cfg, v, batch, f, loss0, g0 = grad_case
    mesh = make_mesh(spec)
    vs = jax.device_put(v, variables_shardings(cfg, mesh, v))
    with mesh_context(mesh):
        loss, g = jax.jit(f)(vs["params"], vs["buffers"], put_batch(batch, mesh))
    g = jax.device_get(g)
    assert abs(float(loss) - loss0) <= 1e-5 * abs(loss0)
    la, lb = jax.tree.leaves(g0), jax.tree.leaves(g)
    total = math.sqrt(sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2)) for a, b in zip(la, lb)))
    assert total <= 1e-5 * math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in la))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], lb):
        assert rel(a, b) <= 5e-5, jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def muon_case():
    from v4jax.parallel.placement import logical_specs
    from v4jax.train.optimizer import OptimizerConfig, make_optimizer

    cfg = tiny_cfg()
    v = random_variables(cfg, 5)
    params = v["params"]
    grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).normal(size=x.shape), x.dtype), params)
    tx = make_optimizer(OptimizerConfig(total_steps=10, decay_start=8, warmup_steps=0), params, logical_specs(cfg))
    upd = lambda g, s, p: tx.update(g, s, p)[0]
    ref = jax.device_get(jax.jit(upd)(grads, tx.init(params), params))
    return cfg, v, grads, tx, upd, ref


@pytest.mark.parametrize("spec", ["fsdp=2,expert=2,tensor=2", "fsdp=8", "data=2,fsdp=2,expert=2", "expert=2,tensor=4"])
def test_distributed_muon_update_on_a_mesh_equals_one_device(muon_case, spec):
    """Distributed Muon (each logical matrix orthogonalised once, on its owner; some leaves with
    their long side split too) = the one-device update, per leaf, on several meshes."""
    from v4jax.train.optimizer import path_str

    cfg, v, grads, tx, upd, ref = muon_case
    params = v["params"]
    mesh = make_mesh(spec)
    sh = variables_shardings(cfg, mesh, v)["params"]
    ps, gs = jax.device_put(params, sh), jax.device_put(grads, sh)
    with mesh_context(mesh):
        out = jax.jit(upd)(gs, jax.jit(tx.init)(ps), ps)
    got = jax.tree.leaves(jax.device_get(out))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], got, strict=True):
        assert rel(a, b) <= 1e-5, path_str(path)
    # the update lands in the parameter's own sharding
    for o, s in zip(jax.tree.leaves(out), jax.tree.leaves(sh), strict=True):
        assert o.sharding.is_equivalent_to(s, o.ndim)


def test_distributed_muon_splits_the_newton_schulz_work(muon_case):
    """Each device runs at most 1.1 x (one device's Newton-Schulz) / devices, by the layout and by
    XLA's cost analysis of the compiled update (which counts a loop body once; same on both)."""
    from v4jax.parallel.placement import logical_specs
    from v4jax.train.optimizer import (
        V4_NS_COEFFS,
        matrix_views,
        muon_layout,
        muon_matrices,
        ns_flops,
        orthogonalize_updates,
        path_str,
    )

    cfg, v, _, _, _, _ = muon_case
    params = v["params"]
    views = matrix_views(params)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    mu = {p: flat[p] for p in views}
    mats = muon_matrices(views, {p: x.shape for p, x in mu.items()})
    total = sum(k * ns_flops(s, l, len(V4_NS_COEFFS)) for k, s, l in mats.values())
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    lay = muon_layout(mats, mesh.shape)
    per = sum(-(-k // lay[p].shards(mesh.shape)[0]) * ns_flops(s, l, len(V4_NS_COEFFS)) / lay[p].shards(mesh.shape)[1]
              for p, (k, s, l) in mats.items())
    assert per <= 1.1 * total / 8
    assert any(lay[p].l_axes for p in mats)          # some leaves have fewer matrices than devices
    lg = {path_str(p): tuple(s) for p, s in jax.tree_util.tree_flatten_with_path(
        logical_specs(cfg), is_leaf=lambda x: isinstance(x, P))[0]}
    tx = orthogonalize_updates(views, axes=lg)
    f = jax.jit(lambda u: tx.update(u, None)[0])
    one = f.lower(mu).compile().cost_analysis()["flops"]
    sh = {path_str(p): s for (p, _), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                              jax.tree.leaves(variables_shardings(cfg, mesh, v)["params"]))}
    with mesh_context(mesh):
        dist = f.lower({p: jax.device_put(x, sh[p]) for p, x in mu.items()}).compile().cost_analysis()["flops"]
    assert dist <= 1.1 * one / 8, (dist, one)


def _losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if not r.get("eval")}, {r["step"]: r for r in rows if r.get("eval")}


def test_checkpoint_written_on_one_mesh_restores_onto_another(tmp_path):
    """The train state saved from data=2,fsdp=2,expert=2 restores onto fsdp=2,expert=2,tensor=2 with
    that mesh's shardings and the same values, and onto one device (``load_workdir`` too)."""
    from v4jax.checkpoint import load_workdir
    from v4jax.parallel.placement import logical_specs
    from v4jax.params import abstract_variables
    from v4jax.train.loop import checkpoint_manager, restore_checkpoint, save_checkpoint
    from v4jax.train.optimizer import make_optimizer
    from v4jax.train.step import init_state, state_shardings

    tc = run_cfg(tiny_cfg(n_layers=2, layer_types=("csa", "hca"), n_mtp_layers=0), async_checkpointing=False)
    tx = make_optimizer(tc.optim, abstract_variables(tc.model)["params"], logical_specs(tc.model))
    st = init_state(tc, tx, mesh=make_mesh("data=2,fsdp=2,expert=2"))
    st["opt_state"] = jax.tree.map(lambda a: a + 0.5 if jnp.issubdtype(a.dtype, jnp.floating) else a, st["opt_state"])
    mngr = checkpoint_manager(tmp_path, tc)
    save_checkpoint(mngr, st, tc, {"pos": 3})
    mngr.wait_until_finished()
    ref = jax.device_get(st)
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    got, data_state = restore_checkpoint(mngr, 0, tc, tx, mesh)
    assert data_state == {"pos": 3}
    want = state_shardings(tc, tx, mesh)
    for a, b, sh in zip(jax.tree.leaves(ref), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_equivalent_to(sh, b.ndim)
    one, _ = restore_checkpoint(mngr, 0, tc, tx)
    assert len(jax.tree.leaves(one["params"])[0].devices()) == 1
    mngr.close()
    model = load_workdir(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params), ref["params"])


@pytest.mark.slow
def test_training_on_meshes_and_resuming_on_another_mesh_gives_the_one_device_losses(tmp_path):
    """``train`` (what ``v4jax-train --mesh`` runs) on data=2,fsdp=2,expert=2 for 2 steps, resumed
    from its checkpoint on fsdp=2,expert=2,tensor=2 with ``ep_capacity=8`` for 2 more (distributed
    Muon throughout): the losses of a one-device run.
    (Slow: three train-step compiles, about 4 minutes on 2 cores; the CI tests cover its parts:
    gradients on every mesh, the Muon update, the restore onto another mesh.)"""
    from v4jax.train.loop import train

    # two layers (CSA with a hash router, HCA), no MTP: the loop, not the model, is under test here
    model = tiny_cfg(n_layers=2, layer_types=("csa", "hca"), n_mtp_layers=0)
    tc = run_cfg(model, total_steps=4, checkpoint_every=2, eval_every=100, eval_batches=1, log_every=1,
                 async_checkpointing=False)
    tc = dataclasses.replace(tc, optim=dataclasses.replace(tc.optim, total_steps=4, decay_start=3, warmup_steps=1),
                             dense_attention_steps=0, indexer_warmup_steps=0)
    quiet = lambda *a: None
    train(tc, tmp_path / "one", progress=False, log=quiet)
    train(dataclasses.replace(tc, mesh="data=2,fsdp=2,expert=2"), tmp_path / "mesh", stop_step=2, progress=False, log=quiet)
    # resumed with expert parallelism's capacity form (all-to-all), a capacity at which nothing drops
    cap = dataclasses.replace(tc, mesh="fsdp=2,expert=2,tensor=2", runtime=dataclasses.replace(tc.runtime, ep_capacity=8.0))
    train(cap, tmp_path / "mesh", progress=False, log=quiet)
    rows = [json.loads(line) for line in open(tmp_path / "mesh" / "metrics.jsonl")]
    assert all(r.get("moe_dropped", 0) == 0 for r in rows if "loss" in r)
    ref, ref_eval = _losses(tmp_path / "one")
    got, got_eval = _losses(tmp_path / "mesh")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for s in ref:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])
    assert abs(got_eval[4]["loss"] - ref_eval[4]["loss"]) <= 1e-5 * ref_eval[4]["loss"]


def _moe_case(hash_routed: bool):
    import flax.linen as nn

    from v4jax.config import preset
    from v4jax.moe.moe import MoE

    cfg = preset("tiny", vocab_size=64, dim=32, moe_inter_dim=16, n_routed_experts=8)
    m = MoE(cfg.moe(hash_routed), impl="blocked")
    x = jax.random.normal(jax.random.key(1), (8, 6, 32))
    ids = jax.random.randint(jax.random.key(2), (8, 6), 0, 64)
    v = nn.meta.unbox(m.init(jax.random.key(0), x, ids))
    v["params"]["gate"]["kernel"] = v["params"]["gate"]["kernel"] * 30.0        # peaked, unbalanced routing
    return cfg, m, v, x, ids


@pytest.mark.parametrize("hash_routed,capacity", [(False, None), (True, None), (False, 8.0)])
def test_expert_parallel_moe_drops_nothing_and_equals_one_device(hash_routed, capacity):
    """Dropless (the all-gather form) and a capacity large enough that nothing drops (the
    all-to-all form): output, loads and gradients equal one device."""
    from v4jax.moe.moe import MoE

    cfg, m, v, x, ids = _moe_case(hash_routed)
    f = jax.jit(lambda p, x: m.apply({**v, "params": p}, x, ids))
    loss = lambda p, x: jnp.sum(f(p, x)[0] ** 2)
    y0, st0 = f(v["params"], x)
    g0 = jax.grad(loss, argnums=(0, 1))(v["params"], x)
    mc = MoE(cfg.moe(hash_routed), impl="blocked", ep_capacity=capacity)
    for spec in ["expert=8", "fsdp=2,expert=4", "expert=2,tensor=4"]:
        mesh = make_mesh(spec)
        with mesh_context(mesh):
            y, st = jax.jit(lambda p, x: mc.apply({**v, "params": p}, x, ids))(v["params"], x)
            g = jax.jit(jax.grad(lambda p, x: jnp.sum(mc.apply({**v, "params": p}, x, ids)[0] ** 2), argnums=(0, 1)))(
                v["params"], x)
        assert int(st["dropped"]) == 0 and int(st0["dropped"]) == 0, spec
        np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-5, atol=1e-5 * float(jnp.abs(y0).max()))
        np.testing.assert_array_equal(np.asarray(st["load"]), np.asarray(st0["load"]))
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g)):
            assert rel(a, b) <= 1e-5, spec
    # decode: one token cannot be split over the devices; it stays replicated
    mesh = make_mesh("expert=8")
    with mesh_context(mesh):
        y1, st1 = jax.jit(lambda x: mc.apply(v, x, ids[:1, :1]))(x[:1, :1])
    np.testing.assert_allclose(np.asarray(y1), np.asarray(m.apply(v, x[:1, :1], ids[:1, :1])[0]), rtol=1e-5, atol=1e-6)
    assert int(st1["dropped"]) == 0


@pytest.mark.parametrize("spec", ["fsdp=2,expert=4", "expert=2,tensor=4"])
def test_expert_parallel_capacity_counts_the_dropped_pairs(spec):
    """With ``ep_capacity`` (the all-to-all form) the dropped pairs are exactly those past each
    (source device, destination shard) budget ``C = ceil(c n K / S)`` in (token, k) order, counted
    in numpy from the routes, and the output is the one-device output without them."""
    from v4jax.moe.experts import experts_dense
    from v4jax.moe.moe import Gate, MoE
    from v4jax.sharding import batch_shards

    cfg, m, v, x, ids = _moe_case(False)
    E, K, N, d = 8, cfg.n_activated_experts, 48, 32
    mesh = make_mesh(spec)
    S, shards = int(mesh.shape["expert"]), batch_shards(mesh)
    factor = 0.75
    mc = MoE(cfg.moe(False), impl="blocked", ep_capacity=factor)
    with mesh_context(mesh):
        y, st = jax.jit(lambda x: mc.apply(v, x, ids))(x)
    _, idx, wts = Gate(cfg.moe(False)).apply({"params": v["params"]["gate"], "buffers": v["buffers"]["gate"]}, x, ids)
    idx, wts = np.asarray(idx).reshape(N, K), np.asarray(wts).reshape(N, K)
    n, E_loc = N // shards, E // S
    C = math.ceil(factor * n * K / S)
    keep = np.zeros(N * K, bool)
    for dev in range(shards):                      # each device's n tokens, its pairs in (token, k) order
        dest = idx[dev * n:(dev + 1) * n].reshape(-1) // E_loc
        for s in range(S):
            keep[(np.flatnonzero(dest == s) + dev * n * K)[:C]] = True
    keep = keep.reshape(N, K)
    assert int(st["dropped"]) == int((~keep).sum()) > 0
    p = v["params"]["experts"]
    routed = lambda w: experts_dense(x.reshape(N, d), jnp.asarray(idx), jnp.asarray(w), p["w1"], p["w2"], p["w3"],
                                     cfg.swiglu_limit)
    shared = np.asarray(m.apply(v, x, ids)[0]).reshape(N, d) - np.asarray(routed(wts))
    np.testing.assert_allclose(np.asarray(y).reshape(N, d), shared + np.asarray(routed(wts * keep)), rtol=1e-4,
                               atol=1e-5)


def test_cpu_exchange_delivers_each_chunk_to_its_destination():
    """The CPU form of the exchange against numpy: chunk j of each device arrives at device j as
    chunk i, its first counts rows as sent. (The ragged form cannot run on XLA:CPU; it is
    compiled for TPU by experiments/pod/ep_muon_aot.py.)"""
    from v4jax.moe.expert_parallel import exchange

    mesh = make_mesh("expert=8")
    S, C, d = 8, 3, 2
    rng = np.random.default_rng(0)
    counts = rng.integers(0, C + 1, size=(S, S)).astype(np.int32)         # [source, destination]
    buf = rng.normal(size=(S, S, C, d)).astype(np.float32)
    buf = buf * (np.arange(C)[None, None, :, None] < counts[:, :, None, None])
    f = jax.shard_map(lambda b, c: exchange(b.reshape(S * C, d), c.reshape(S), "expert", ragged=False)[None],
                      mesh=mesh, in_specs=(P("expert"), P("expert")), out_specs=P("expert"))
    got = np.asarray(f(jnp.asarray(buf.reshape(S, S * C, d)), jnp.asarray(counts))).reshape(S, S, C, d)
    np.testing.assert_array_equal(got, buf.transpose(1, 0, 2, 3))      # got[j, i] = buf[i, j]


def test_generate_on_a_mesh_equals_one_device():
    import v4jax

    cfg = tiny_cfg()
    model = v4jax.V4Model(cfg, random_variables(cfg, 7))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 11))
    ref = model.generate(ids, 6, stop_tokens=())
    sharded = model.shard("data=2,expert=2,tensor=2")
    w1 = sharded.params["stack_1"]["layer_0"]["ffn"]["experts"]["w1"]
    assert w1.sharding.spec == P(None, "expert", None, "tensor")
    np.testing.assert_array_equal(sharded.generate(ids, 6, stop_tokens=()), ref)
    cache = sharded.new_cache(8, 32)
    assert cache["pos"].sharding.spec == P(("data", "expert"))
    assert jax.tree.leaves(cache["layers"]["stack_0"]["layer_0"]["window"])[0].sharding.spec == P(None, ("data", "expert"))


@pytest.mark.parametrize("layer_type", ["hca", "csa"])
def test_pallas_attention_runs_per_device_and_equals_one_device(layer_type):
    """Under a mesh the Pallas kernels are called inside shard_map (batch over the batch axes,
    heads over tensor) and give the one-device values."""
    from v4jax.attention.backend import attend
    from v4jax.attention.context import SeqContext

    cfg = tiny_cfg(n_heads=4)
    spec = cfg.attention(layer_type)
    B, T, H, c = 4, 16, 4, spec.head_dim
    r = np.random.default_rng(0)
    q, kv = jnp.asarray(r.normal(size=(B, T, H, c)), jnp.float32), jnp.asarray(r.normal(size=(B, T, c)), jnp.float32)
    sink = jnp.asarray(r.normal(size=(H,)), jnp.float32)
    ratio = spec.compressor.ratio
    comp = jnp.asarray(r.normal(size=(B, T // ratio, c)), jnp.float32)
    topk = jnp.asarray(np.sort(r.integers(-1, T // ratio, (B, T, 2)), -1), jnp.int32) if layer_type == "csa" else None
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], B, 0), jnp.int32)
    f = lambda q, kv, sink, comp: attend("pallas", spec, q, kv, sink, comp, topk, SeqContext(segment_ids=seg))
    out0, lse0 = jax.jit(f)(q, kv, sink, comp)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    with mesh_context(mesh):
        assert "shard_map" in str(jax.make_jaxpr(f)(q, kv, sink, comp))
        out, lse = jax.jit(f)(q, kv, sink, comp)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse0), rtol=1e-5, atol=1e-5)
