"""Shared test helpers: a small config with every layer type and randomised (non-default) weights."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import host
from v4jax.config import preset

jax.config.update("jax_default_matmul_precision", "highest")
# 8 simulated CPU devices for the mesh tests (tests/test_parallel.py); everything else runs on
# device 0 as before. Must be set before the first computation creates the CPU backend.
N_DEVICES = 8
jax.config.update("jax_num_cpu_devices", N_DEVICES)
# One persistent XLA compilation cache per checkout, shared by the xdist workers and by the
# v4jax-train subprocesses the tests launch (they inherit the variable): many tests build the same
# tiny graphs through new function objects, which jax's in-memory cache does not share. Keyed by the
# HLO, the jaxlib version and the flags, so a hit is the same executable. A fresh clone starts empty.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


# malloc tuned for XLA:CPU (v4jax.host) in the processes the suite starts: the xdist workers (started
# after this file is read; they run every test under -n) and the v4jax-train subprocesses.
if os.environ.get(host.OPT_OUT) != "0":
    os.environ["GLIBC_TUNABLES"] = host.tuned_environ()["GLIBC_TUNABLES"]


def small_config(**kw):
    """All three layer types, hash + learned routing, YaRN on, ratios small enough for short T."""
    base = dict(name="test", vocab_size=256, dim=64, n_layers=4, layer_types=("window", "csa", "hca", "csa"),
                hca_ratio=8, n_hash_layers=2, n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=32,
                o_groups=2, o_lora_rank=16, window_size=8, index_n_heads=8, index_head_dim=16, index_topk=3,
                n_routed_experts=8, n_activated_experts=2, moe_inter_dim=32, original_seq_len=16,
                rope_factor=4.0, max_seq_len=4096)
    base.update(kw)
    return preset("tiny", **base)


def random_variables(cfg, seed: int = 0):
    """Random weights with the exact tree of ``Transformer(cfg).init``, drawn on the host (no
    compile), drawn per layer and stacked like the model's scanned layers. Nothing is left at its init value: sinks, position biases, mHC biases/scales, norm
    weights and router biases are all non-trivial (init values hide bugs)."""
    import flax.traverse_util as tu
    from v4jax.moe.moe import default_tid2eid
    from v4jax.model.layout import stack_variables, unstack_variables
    from v4jax.params import abstract_variables

    rng = np.random.default_rng(seed)
    flat = tu.flatten_dict(unstack_variables(cfg, abstract_variables(cfg)), sep="/")
    out = {}
    for path, leaf in flat.items():
        shape, name = leaf.shape, path.split("/")[-1]
        if name == "tid2eid":
            x = default_tid2eid(shape[0], cfg.n_routed_experts, shape[1], seed)
        elif name == "scale" and "hc" in path:                   # mHC gating factors
            x = rng.uniform(0.3, 1.5, shape)
        elif name == "scale":                                   # RMSNorm weights
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("attn_sink", "base", "ape", "bias"):
            x = (1.0 if name == "attn_sink" else 0.3) * rng.standard_normal(shape)
        elif name == "fn":
            x = 0.05 * rng.standard_normal(shape)
        elif name == "embedding":
            x = rng.standard_normal(shape)
        else:                                                   # matrices: unit-variance outputs
            fan_in = shape[-2] if len(shape) >= 2 else 1
            x = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[path] = jnp.asarray(x, leaf.dtype)
    return stack_variables(cfg, tu.unflatten_dict(out, sep="/"))


@pytest.fixture(scope="session")
def small_model():
    cfg = small_config()
    return v4jax.V4Model(cfg, random_variables(cfg, seed=1))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
