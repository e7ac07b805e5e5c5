"""Training: curriculum stages (who gets gradients), router-bias balancing, non-finite steps and
the run config. Whole runs (signals, crashes, resume) are in ``test_reliability.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables, small_config
from v4jax.config import ConfigError
from v4jax.moe.router import affinity, topk_route
from v4jax.train.config import TrainConfig, train_preset
from v4jax.train.losses import target_masks, updated_router_biases
from v4jax.train.optimizer import OptimizerConfig, make_optimizer
from v4jax.train.step import _forward_losses, init_state, make_train_step

T = 32


def _cfg(**kw) -> TrainConfig:
    # every layer type once (window, CSA, HCA), hash and learned routing, MTP
    base = dict(model=small_config(n_layers=3, layer_types=("window", "csa", "hca")), name="test", seq_len=T, batch_size=2, total_steps=20,
                optim=OptimizerConfig(total_steps=20, decay_start=15, warmup_steps=0, peak_lr=1e-2, final_lr=1e-3),
                dense_attention_steps=2, indexer_warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def _batch(rng, B=2, boundary=20):
    tokens = rng.integers(1, 256, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T + 1), np.int32)
    seg[:, boundary:] = 2
    seg[-1, -3:] = 0                      # trailing padding in the last row
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    v = random_variables(cfg.model, seed=2)
    return cfg, v


def _grads(cfg, stage, v, batch, which):
    """Gradient of one loss term (``which``: lm or indexer_kl) in ``stage``."""
    def f(params):
        _, (aux, _, _) = _forward_losses(cfg, stage, params, v["buffers"], batch, jnp.int32(0))
        return aux[which]
    return jax.jit(jax.grad(f))(v["params"])


def _by_indexer(grads):
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    idx = [float(jnp.max(jnp.abs(g))) for p, g in flat if "indexer" in jax.tree_util.keystr(p)]
    other = [float(jnp.max(jnp.abs(g))) for p, g in flat if "indexer" not in jax.tree_util.keystr(p)]
    return idx, other


@pytest.mark.parametrize("stage", ["indexer_warmup", "sparse"])
def test_indexer_kl_reaches_only_the_indexer(setup, stage):
    cfg, v = setup
    idx, other = _by_indexer(_grads(cfg, stage, v, _batch(np.random.default_rng(0)), "indexer_kl"))
    assert max(other) == 0.0
    assert min(idx) > 0.0           # every indexer tensor (wq_b, weights_proj, its compressor) learns


def test_lm_loss_does_not_reach_the_indexer_in_sparse_stage(setup):
    cfg, v = setup
    idx, other = _by_indexer(_grads(cfg, "sparse", v, _batch(np.random.default_rng(0)), "lm_loss"))
    assert max(idx) == 0.0 and min(other) >= 0.0 and max(other) > 0.0


def test_stage_steps_freeze_the_right_parameters(setup):
    """indexer_warmup: only the indexer moves; dense: everything but the indexer moves; the
    optimizer state of frozen parameters is kept too."""
    cfg, v = setup
    tx = make_optimizer(cfg.optim, v["params"])
    batch = _batch(np.random.default_rng(1))
    for stage, moves_indexer, moves_rest in (("indexer_warmup", True, False), ("dense", False, True)):
        state = init_state(cfg, tx, jax.tree.map(jnp.array, v))
        old = jax.tree.map(np.asarray, state)
        state = jax.tree.map(jnp.array, state)
        new, m = make_train_step(cfg, tx, stage)(state, batch)
        assert int(m["skipped"]) == 0
        flat_new = dict(jax.tree_util.tree_flatten_with_path(new["params"])[0])
        for p, o in jax.tree_util.tree_flatten_with_path(old["params"])[0]:
            changed = not np.array_equal(np.asarray(flat_new[p]), o)
            assert changed == (moves_indexer if "indexer" in jax.tree_util.keystr(p) else moves_rest), jax.tree_util.keystr(p)
        biases_moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["buffers"]),
                                                                    jax.tree.leaves(old["buffers"])))
        assert biases_moved == (stage != "indexer_warmup")


def test_bias_update_moves_toward_balance():
    """Aux-loss-free balancing alone (no gradient): skewed router, b <- b + g*sign(mean - load);
    the max/mean load falls from > 1.8 to < 1.3, and one update moves each bias by exactly +-g."""
    rng = np.random.default_rng(0)
    E, K, N, d = 16, 2, 4096, 32
    x = rng.standard_normal((N, d)).astype(np.float32)
    w = rng.standard_normal((d, E)).astype(np.float32) * 0.3
    w[:, :3] += 0.5                                   # experts 0-2 attract most tokens
    scores = affinity(jnp.asarray(x @ w), "sqrtsoftplus")
    bias = jnp.zeros(E)

    def load(b):
        idx = topk_route(scores, b, K)
        return jnp.sum(jax.nn.one_hot(idx, E), axis=(0, 1))

    start = float(jnp.max(load(bias)) / jnp.mean(load(bias)))
    buffers = {"layers_0": {"ffn": {"gate": {"bias": bias}}}}
    ld = load(bias)
    one = updated_router_biases(buffers, [{"load": ld}], None, 1e-2)["layers_0"]["ffn"]["gate"]["bias"]
    np.testing.assert_array_equal(np.asarray(one), 1e-2 * np.sign(float(jnp.mean(ld)) - np.asarray(ld)))
    for _ in range(300):
        buffers = updated_router_biases(buffers, [{"load": load(buffers["layers_0"]["ffn"]["gate"]["bias"])}],
                                        None, 1e-2)
    end_load = load(buffers["layers_0"]["ffn"]["gate"]["bias"])
    end = float(jnp.max(end_load) / jnp.mean(end_load))
    assert start > 1.8 and end < 1.3, (start, end)


def test_nonfinite_step_is_not_applied_and_never_checkpointed(setup, tmp_path):
    cfg, v = setup
    tx = make_optimizer(cfg.optim, v["params"])
    state = init_state(cfg, tx, jax.tree.map(jnp.array, v))
    batch = _batch(np.random.default_rng(2))
    tok = int(batch["tokens"][0, 0])
    state["params"]["embed"]["embedding"] = state["params"]["embed"]["embedding"].at[tok].set(jnp.nan)
    before = jax.tree.map(np.asarray, state)
    new, m = make_train_step(cfg, tx, "sparse", jit=True)(jax.tree.map(jnp.array, state), batch)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(new["step"]) == int(before["step"]) + 1
    for a, b in zip(jax.tree.leaves(new["opt_state"]) + jax.tree.leaves(new["buffers"]),
                    jax.tree.leaves(before["opt_state"]) + jax.tree.leaves(before["buffers"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(np.asarray(new["params"]["head"]["kernel"]), before["params"]["head"]["kernel"])
    # the state now holds a NaN (we planted it): a checkpoint must refuse it and leave no step behind
    from v4jax.train.loop import NonFiniteError, checkpoint_manager, save_checkpoint

    mngr = checkpoint_manager(str(tmp_path), cfg)
    with pytest.raises(NonFiniteError, match="non-finite"):
        save_checkpoint(mngr, new, cfg, {"pos": 0})
    mngr.wait_until_finished()
    assert mngr.latest_step() is None


def test_target_masks_respect_documents():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0]])
    main, mtp = target_masks(seg)
    np.testing.assert_array_equal(np.asarray(main), [[1, 1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(mtp), [[1, 0, 0, 0, 0, 0]])


def test_run_config_overrides_and_round_trip(tmp_path):
    cfg = train_preset("tiny", ["batch_size=3", "model.dim=128", "optim.peak_lr=0.001", "eval_batches=null"])
    assert cfg.batch_size == 3 and cfg.model.dim == 128 and cfg.optim.peak_lr == 1e-3
    cfg.to_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg
    assert train_preset(str(tmp_path / "c.json")) == cfg
    assert [cfg.stage(s) for s in (0, 19, 20, 29, 30)] == ["dense", "dense", "indexer_warmup",
                                                                "indexer_warmup", "sparse"]
    for bad, msg in (["nope=1"], "no field"), (["model.nope=1"], "no field"), (["batch_size=0"], "batch_size"), \
                    (["optim.peak_lr=-1"], "peak_lr"), (["tokenizer=gpt2"], "tokenizer"):
        with pytest.raises(ConfigError, match=msg):
            train_preset("tiny", bad)
    with pytest.raises(ConfigError, match="unknown run config"):
        train_preset("huge")
    for name in ("small", "flash", "pro"):
        assert train_preset(name).model.name == name


@pytest.mark.parametrize("stage", [pytest.param("indexer_warmup", marks=pytest.mark.slow), "sparse"])
def test_xla_attention_training_losses_and_grads_equal_the_oracle(setup, stage):
    """The default (sub-quadratic XLA) attention against the dense masked oracle in a training
    forward/backward with packed documents and padding, the indexer KL on: every loss part to
    2e-5 relative, every gradient leaf within 1e-4 of its max."""
    from v4jax.runtime import Runtime

    cfg, v = setup
    batch = _batch(np.random.default_rng(5))
    res = {}
    for impl in ("reference", "xla"):
        c = TrainConfig.from_dict({**cfg.to_dict(), "runtime": Runtime(attention=impl).to_dict()})

        def f(params, c=c):
            total, (aux, _, _) = _forward_losses(c, stage, params, v["buffers"], batch, jnp.int32(0))
            return total, aux
        res[impl] = jax.device_get(jax.jit(jax.value_and_grad(f, has_aux=True))(v["params"]))
    ((t_ref, a_ref), g_ref), ((t_x, a_x), g_x) = res["reference"], res["xla"]
    np.testing.assert_allclose(t_x, t_ref, rtol=2e-5)
    for k in a_ref:
        np.testing.assert_allclose(a_x[k], a_ref[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_ref)[0], jax.tree.leaves(g_x)):
        tol = 1e-4 * float(np.max(np.abs(a))) + 1e-9
        assert float(np.max(np.abs(b - a))) <= tol, jax.tree_util.keystr(path)
