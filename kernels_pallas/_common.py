"""Shared helpers for the Pallas kernels: backend choice, padding, the "row" layout, mask and
online-softmax math used by every kernel body (TPU and portable alike).

Row layout. Queries ``[B, T, H, c]`` are viewed as ``[B, T*H, c]`` (a free reshape): row
``r = t*H + h``. A query block of ``bq`` tokens is ``R = bq*H`` consecutive rows, so the H heads
that share the single K=V head become the M dimension of every matmul (MQA trick). Masks are
computed per row from the row's token index ``r // H`` (``row_token``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

NEG = -1e30  # finite "minus infinity" for masked logits (exp(NEG - m) == 0 for any sane m)


# ----------------------------------------------------------------------------- backend choice

@dataclasses.dataclass(frozen=True)
class Backend:
    """``kind``: "tpu" (Mosaic wrapper: pipelined grid, scalar/SMEM index tables, manual DMA
    gathers) or "portable" (Triton on GPU, or the generic interpreter on CPU: one program per
    block, loops inside, indices as a normal input). ``interpret``: run under an interpreter
    (``True`` for portable, ``pltpu.InterpretParams()`` for the TPU wrapper)."""

    kind: str
    interpret: bool
    gpu: bool = False  # portable wrapper targeting Triton (power-of-two blocks, real atomics)

    @property
    def interpret_arg(self):
        if not self.interpret:
            return False
        if self.kind == "tpu":
            from jax.experimental.pallas import tpu as pltpu
            return pltpu.InterpretParams()
        return True


def resolve_backend(backend: str | None = None, interpret: bool | None = None) -> Backend:
    """``backend``: None (``jax.default_backend()``), "tpu", "gpu"/"cuda"/"rocm" or "cpu".
    ``interpret``: None = auto (interpret only on CPU). ``backend="tpu", interpret=True`` runs
    the TPU wrapper under Pallas' TPU interpreter (simulated DMAs/SMEM) on any machine."""
    name = jax.default_backend() if backend is None else backend
    if name == "tpu":
        return Backend("tpu", bool(interpret))
    if name in ("gpu", "cuda", "rocm"):
        return Backend("portable", bool(interpret), gpu=True)
    if interpret is False:
        raise ValueError("Pallas runs only in interpret mode on CPU")
    return Backend("portable", True)


# ----------------------------------------------------------------------------- small utils

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def align_dim(x: int, align: int | str) -> int:
    """Pad a size: to a multiple of ``align``, or to a power of two (``"pow2"``)."""
    if align == "pow2":
        return next_pow2(max(x, 1))
    return round_up(max(x, 1), align)


def pad_axis(x: jnp.ndarray, axis: int, size: int, value=0) -> jnp.ndarray:
    n = x.shape[axis]
    if n == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - n)
    return jnp.pad(x, widths, constant_values=value)


def is_low_precision(dtype) -> bool:
    return jnp.dtype(dtype).itemsize < 4


# ----------------------------------------------------------------------------- in-kernel math

def row_token(rows: int, heads: int, axis: int = 0) -> jnp.ndarray:
    """Token index ``r // heads`` of each row, as an int32 column ``[rows, 1]`` (axis=0) or row
    ``[1, rows]`` (axis=1). Computed in f32 (``floor((r + 0.5) / heads)``, exact for
    ``rows * heads < 2**22``) so it lowers on every backend without vector integer division."""
    shape = (rows, 1) if axis == 0 else (1, rows)
    r = lax.broadcasted_iota(jnp.int32, shape, axis)
    if heads == 1:
        return r
    if heads & (heads - 1) == 0:
        return lax.shift_right_logical(r, jnp.int32(heads.bit_length() - 1))
    return jnp.floor((r.astype(jnp.float32) + 0.5) * (1.0 / heads)).astype(jnp.int32)


def dot_nt(a, b):
    """``a @ b.T`` with f32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """``a.T @ b`` with f32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def online_update(m, l, acc, s, mask, v, cd):
    """One online-softmax step. m, l ``[R, 1]``; acc ``[R, c]``; s ``[R, n]`` scaled logits;
    mask ``[R, n]`` bool (or None); v ``[n, c]`` values; ``cd`` matmul operand dtype."""
    if mask is not None:
        s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot_nn(p.astype(cd), v.astype(cd))
    return m_new, l, acc


def softmax_grads(q, do, lse, dterm, s, mask, k, cd):
    """Backward of one (rows x keys) tile with K = V = k.

    q, do ``[R, c]``; lse, dterm ``[R, 1]`` (dterm = delta - g_lse); s ``[R, n]`` scaled logits;
    returns (p, ds) ``[R, n]`` f32 with ``ds = p * (dp - dterm)`` (not yet multiplied by scale)."""
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = dot_nt(do.astype(cd), k.astype(cd))
    ds = p * (dp - dterm)
    return p, ds


def key_grad(p, ds, q, do, scale, cd):
    """Gradient of the shared K=V rows of a tile: ``p^T do + scale * ds^T q`` ``[n, c]`` f32."""
    return dot_tn(p.astype(cd), do.astype(cd)) + scale * dot_tn(ds.astype(cd), q.astype(cd))


# ----------------------------------------------------------------------------- GPU AOT helpers

def abstract_gpu_mesh(device_kind: str = "NVIDIA H100 80GB HBM3"):
    """An abstract mesh with one CUDA device, so Triton kernels can be lowered on a CPU-only
    machine: ``with jax.sharding.use_abstract_mesh(abstract_gpu_mesh()): f.trace(...).lower(
    lowering_platforms=("cuda",))``."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType
    dev = AbstractDevice(device_kind=device_kind, num_cores=132, platform="cuda")
    return AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)


def lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def idiv(a, b):
    """Floor division of NON-NEGATIVE ints, python or traced. Traced values use ``lax.div``
    (truncation == floor here): ``jnp.floor_divide`` lowers through ``sign``, which Mosaic
    lowers only for a known TPU generation."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def imod(a, b):
    """Remainder of NON-NEGATIVE ints, python or traced (``lax.rem``)."""
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    return lax.rem(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
