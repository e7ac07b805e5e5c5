"""``Runtime(attention="pallas")`` end to end (interpret mode on CPU): the public loader gives a model whose
logits equal transformers' (the same fixture as test_parity) and the reference path's, and one
training step (packed documents, sparse stage with the indexer KL) equals the reference step."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from conftest import random_variables, small_config

from v4jax.runtime import Runtime

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf_mixed")


def test_load_hf_with_pallas_attention_matches_transformers_and_reference():
    ref = np.load(os.path.join(FIXTURE, "expected.npz"))
    model = v4jax.load_hf(FIXTURE, attention_impl="pallas")
    assert model.runtime.attention == "pallas"
    got = np.asarray(model(ref["input_ids"]))
    scale = float(np.max(np.abs(ref["logits"])))
    assert float(np.max(np.abs(got - ref["logits"]))) <= 1e-4 * scale
    base = np.asarray(v4jax.load_hf(FIXTURE, attention="reference")(ref["input_ids"]))
    assert float(np.max(np.abs(got - base))) <= 2e-5 * scale


def test_pallas_training_step_equals_reference():
    """Loss parts and every gradient leaf of a sparse-stage training step (packed documents,
    indexer KL) agree. The jitted train step around them is the same code for every attention
    backend (tests/test_train.py runs it); parameters after an update are not compared: the
    first AdamW step is ~lr*sign(g), which flips on near-zero gradient entries."""
    import optax

    from v4jax.train.config import TrainConfig
    from v4jax.train.optimizer import OptimizerConfig
    from v4jax.train.step import _forward_losses

    T = 24
    out = {}
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 256, (2, T + 1)), jnp.int32)
    seg = np.ones((2, T + 1), np.int32)
    seg[0, 13:] = 2
    batch = {"tokens": tokens, "segment_ids": jnp.asarray(seg)}
    for impl in ("reference", "pallas"):
        # every layer type once (window, CSA, HCA; hash and learned routing): each pallas kernel
        mc = small_config(n_layers=3, layer_types=("window", "csa", "hca"), n_mtp_layers=0)
        cfg = TrainConfig(model=mc, runtime=Runtime(attention=impl), optim=OptimizerConfig(total_steps=10, decay_start=8, warmup_steps=0, peak_lr=1e-2),
                          seq_len=T, batch_size=2, total_steps=10)
        v = random_variables(mc, seed=3)
        # loss parts and gradients of the step's loss, from one compile per implementation
        f = lambda p, b, cfg=cfg: _forward_losses(cfg, "sparse", p, b, batch, 0)
        (loss, (aux, _, _)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(v["params"], v["buffers"])
        parts = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        out[impl] = (jax.device_get(parts), jax.device_get(grads))
    (m_ref, g_ref), (m_pal, g_pal) = out["reference"], out["pallas"]
    for k in ("loss", "lm_loss", "indexer_kl", "grad_norm"):
        np.testing.assert_allclose(m_pal[k], m_ref[k], rtol=2e-5, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_ref)[0], jax.tree.leaves(g_pal)):
        tol = 1e-4 * float(np.max(np.abs(a))) + 1e-8
        assert float(np.max(np.abs(b - a))) <= tol, jax.tree_util.keystr(path)
