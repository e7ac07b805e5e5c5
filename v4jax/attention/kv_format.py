"""Storage formats of cached KV entries (spec 3.8 "production layout", spec 8).

* ``native``: entries stored as arrays of the compute dtype.
* ``fp8``: main KV entries (window ring and compressed entries) keep the rope dims in bf16 and
  store the other dims as FP8 e4m3 with one power-of-two (ue8m0) scale per 64 values; the indexer
  keys are rotated by a normalised Walsh-Hadamard matrix (as the official QAT path does; the
  rotation is orthogonal, so q.k is unchanged in full precision) and stored as FP4 e2m1 with one
  ue8m0 scale per 32 values.

A stored buffer is then a dict ``{"q": e4m3, "scale": e8m0[, "rope": bf16]}`` or
``{"q4": e2m1, "scale": e8m0}``; ``store`` and ``load`` accept any form, so the cache update rules
do not care which one they hold. (JAX keeps one FP4 value per byte in memory; the memory report
counts FP4 as packed, two per byte, as a serving layout stores it.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import numpy as np

BLOCK = 64
BLOCK4 = 32
E4M3_MAX = 448.0
E2M1_MAX = 6.0


def hadamard(n: int) -> np.ndarray:
    """Normalised Sylvester-Hadamard matrix ``[n, n]`` (symmetric and orthogonal); n a power of 2."""
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two width, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def empty(shape: tuple[int, ...], dtype, fmt: str, rope_dim: int, kind: str = "main"):
    """A zero buffer ``shape = (..., c)`` in format ``fmt`` (``rope_dim = 0``: no bf16 rope part);
    ``kind="index"`` selects the indexer-key layout."""
    if fmt == "native":
        return jnp.zeros(shape, dtype)
    c = shape[-1]
    if kind == "index":
        hadamard(c)
        if c % BLOCK4:
            raise ValueError(f"fp4 indexer cache needs index_head_dim ({c}) to be a multiple of {BLOCK4}")
        return {"q4": jnp.zeros(shape, jnp.float4_e2m1fn),
                "scale": jnp.ones(shape[:-1] + (c // BLOCK4,), jnp.float8_e8m0fnu)}
    n = c - rope_dim
    if n % BLOCK:
        raise ValueError(f"fp8 KV cache needs the non-rope width ({n}) to be a multiple of {BLOCK}")
    buf = {"q": jnp.zeros(shape[:-1] + (n,), jnp.float8_e4m3fn),
           "scale": jnp.ones(shape[:-1] + (n // BLOCK,), jnp.float8_e8m0fnu)}
    if rope_dim:
        buf["rope"] = jnp.zeros(shape[:-1] + (rope_dim,), jnp.bfloat16)
    return buf


def encode(x: jnp.ndarray, like) -> object:
    """Values ``[..., c]`` in the format of buffer ``like``."""
    if not isinstance(like, dict):
        return x.astype(like.dtype)
    xf = x.astype(jnp.float32)
    if "q4" in like:
        xr = xf @ jnp.asarray(hadamard(xf.shape[-1]))
        blocks = xr.reshape(*xr.shape[:-1], -1, BLOCK4)
        amax = jnp.max(jnp.abs(blocks), axis=-1)
        scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / E2M1_MAX)))
        q = (blocks / scale[..., None]).astype(jnp.float4_e2m1fn).reshape(xr.shape)
        return {"q4": q, "scale": scale.astype(jnp.float8_e8m0fnu)}
    r = like["rope"].shape[-1] if "rope" in like else 0
    nope = xf[..., : xf.shape[-1] - r]
    blocks = nope.reshape(*nope.shape[:-1], -1, BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / E4M3_MAX)))
    q = (blocks / scale[..., None]).astype(jnp.float8_e4m3fn).reshape(nope.shape)
    out = {"q": q, "scale": scale.astype(jnp.float8_e8m0fnu)}
    if r:
        out["rope"] = xf[..., -r:].astype(jnp.bfloat16)
    return out


def load(buf) -> jnp.ndarray:
    """Decode a buffer to fp32 (native buffers are returned as they are)."""
    if not isinstance(buf, dict):
        return buf
    if "q4" in buf:
        q = buf["q4"].astype(jnp.float32)
        s = buf["scale"].astype(jnp.float32)
        xr = (q.reshape(*q.shape[:-1], -1, BLOCK4) * s[..., None]).reshape(q.shape)
        return xr @ jnp.asarray(hadamard(q.shape[-1]))  # H is its own inverse
    q = buf["q"].astype(jnp.float32)
    s = buf["scale"].astype(jnp.float32)
    nope = (q.reshape(*q.shape[:-1], -1, BLOCK) * s[..., None]).reshape(q.shape)
    if "rope" in buf:
        return jnp.concatenate([nope, buf["rope"].astype(jnp.float32)], axis=-1)
    return nope


def store(buf, dest: jnp.ndarray, values: jnp.ndarray):
    """One sequence: ``buf[dest] = values`` (out-of-range ``dest`` entries are dropped)."""
    enc = encode(values, buf)
    return jax.tree.map(lambda b, v: b.at[dest].set(v, mode="drop"), buf, enc)
