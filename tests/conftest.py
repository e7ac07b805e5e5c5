"""Shared test helpers: a small config with every layer type and randomised (non-default) weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax.config import preset

jax.config.update("jax_default_matmul_precision", "highest")


def small_config(**kw):
    """All three layer types, hash + learned routing, YaRN on, ratios small enough for short T."""
    base = dict(name="test", vocab_size=256, dim=64, n_layers=4, layer_types=("window", "csa", "hca", "csa"),
                hca_ratio=8, n_hash_layers=2, n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=32,
                o_groups=2, o_lora_rank=16, window_size=8, index_n_heads=8, index_head_dim=16, index_topk=3,
                n_routed_experts=8, n_activated_experts=2, moe_inter_dim=32, original_seq_len=16,
                rope_factor=4.0, max_seq_len=4096)
    base.update(kw)
    return preset("tiny", **base)


def randomize(variables, seed: int = 0, scale: float = 0.3):
    """Perturb every float parameter so that sinks, position biases, mHC biases/scales, norms and
    router biases are all non-trivial (the init values hide bugs)."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for k, x in zip(keys, leaves):
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x + scale * jax.random.normal(k, x.shape, x.dtype) * (1.0 if x.ndim < 2 else 0.3)
        out.append(x)
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="session")
def small_model():
    cfg = small_config()
    m = v4jax.V4Model.init(cfg, seed=0)
    return v4jax.V4Model(cfg, randomize(m.variables, seed=1))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
