"""Test helpers shared by the kernel tests: random inputs, packed-document segment ids, and one
jit per (function, config) computing outputs, lse and all gradients together (a fixed random
linear loss on out and lse, so the lse cotangent is exercised)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.indexer.reference import select_visible_topk, visibility


def segments(B: int, T: int, docs_per_row=(3, 2), seed: int = 0) -> np.ndarray:
    """``[B, T]`` int32 packed-document ids, ``docs_per_row[b % len]`` documents in row b."""
    rng = np.random.default_rng(seed)
    out = np.zeros((B, T), np.int32)
    for b in range(B):
        n = docs_per_row[b % len(docs_per_row)]
        cuts = np.sort(rng.choice(np.arange(2, T - 1), n - 1, replace=False))
        out[b] = np.searchsorted(cuts, np.arange(T), side="right")
    return out


def comp_segments(seg: np.ndarray, N: int, ratio: int) -> np.ndarray:
    """Segment of compressed entry i = the segment of its block's last token."""
    return seg[:, np.arange(N) * ratio + ratio - 1].astype(np.int32)


def attention_inputs(B, T, H, c, N, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)
    return f(B, T, H, c), f(B, T, c), jnp.asarray(rng.normal(size=(H,)), jnp.float32), f(B, N, c)


def random_topk(B, T, N, K, ratio, seg=None, cseg=None, drop=0.2, seed=0) -> jnp.ndarray:
    """Top-k lists as the model makes them (top-k of random scores over the visible entries, so
    early queries get all -1), then ``drop`` of the remaining picks knocked out to -1 mid-list."""
    rng = np.random.default_rng(seed + 1)
    vis = visibility(T, N, ratio, None if seg is None else jnp.asarray(seg),
                     None if seg is None else jnp.asarray(cseg), B)
    idx = np.asarray(select_visible_topk(jnp.asarray(rng.normal(size=(B, T, N)), jnp.float32), vis, K))
    idx = np.where(rng.random(idx.shape) < drop, -1, idx)
    return jnp.asarray(idx, jnp.int32)


def value_and_grads(fn, diff_args, *, n_out_weights_seed=7):
    """jit of ``fn(*diff_args) -> (out, lse)`` returning ``(out, lse, grads)`` under the loss
    ``sum(out * Wo) + sum(lse * Wl)`` with fixed random Wo, Wl."""
    def run(*args):
        o, l = jax.eval_shape(fn, *args)
        rng = np.random.default_rng(n_out_weights_seed)
        wo = jnp.asarray(rng.normal(size=o.shape), jnp.float32)
        wl = jnp.asarray(rng.normal(size=l.shape), jnp.float32)

        def loss(*a):
            out, lse = fn(*a)
            return jnp.sum(out * wo) + jnp.sum(lse * wl), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
        return out, lse, grads

    return jax.jit(run)(*diff_args)


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def rel_err(a, b) -> float:
    """Max abs error relative to the max magnitude of the reference."""
    b = jnp.asarray(b, jnp.float32)
    return max_err(a, b) / max(float(jnp.max(jnp.abs(b))), 1e-30)


def upcast(*xs):
    """fp32 copies of (bf16-rounded) inputs, for the fp32 reference."""
    return tuple(x.astype(jnp.float32) for x in xs)


# The TPU wrapper under Pallas' TPU interpreter (simulated DMAs, SMEM, semaphores): ~1 min per
# test on 2 CPU cores, so `slow` (run them with `pytest -m slow kernels_pallas`).
def tpu_interpret_test(fn):
    import pytest

    return pytest.mark.slow(fn)
