"""Block-quantized weights as DeepSeek-V4 stores them (spec 8), in jnp: kept native in memory,
dequantized inside the compiled program, and the same rounding as fake quantisation for QAT.

Formats (the released checkpoints' ``quantization_config``: fp8 e4m3, ``weight_block_size``
[128, 128], ``scale_fmt`` ue8m0; ``expert_dtype`` fp4):

* ``"fp8"``: codes ``float8_e4m3fn [..., out, in]`` (checkpoint layout) and one power-of-two
  scale (``float8_e8m0fnu``) per ``block = (128, 128)`` tile: ``[..., ceil(out/128), ceil(in/128)]``
  (edge tiles are partial). Used for the attention projections, the shared expert and the
  indexer's ``wq_b``.
* ``"fp4"``: MXFP4 for the routed experts: e2m1 codes packed two per byte along ``in`` (LOW
  nibble first, bit 3 the sign, bits 0-2 index ``0, .5, 1, 1.5, 2, 3, 4, 6``), ``uint8
  [..., out, in/2]``, and one e8m0 scale per 1 x 32 block: ``[..., out, in/32]``.

``QuantizedWeight`` holds the codes and scales in the checkpoint layout, so a loaded tensor is
its file's bytes (FP4 stays packed: JAX would keep a ``float4_e2m1fn`` array at one byte per
value). ``dequantize`` gives the weight in v4jax's layout (``[..., in, out]`` kernels; ``wo_a``
``[g, in, d_g]``): under ``jit`` that is an XLA fusion feeding the matmul, one layer at a time
inside the scanned stack, so the weights never exist dequantized as a whole. The leading axes
(stacked layers, experts) are arbitrary, so ``nn.scan`` and the layer-stacking code slice a
``QuantizedWeight`` like any other pytree.

``quantize`` is the rounding the official checkpoints use: the scale of a block is the
smallest power of two with ``amax / scale <= fmax`` (448 for e4m3, 6 for e2m1; ``amax`` at
least 1e-4, as the official ``act_quant``), the codes are ``x / scale`` rounded to nearest even.
``fake_quantize`` is ``dequantize(quantize(w))`` with a straight-through gradient: QAT's
forward sees exactly the values that a checkpoint exported with ``quantize`` and loaded native
gives. Why not qwix (the maintained QAT library): see ``fake_quantize``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from v4jax.config import QAT_MODES

FP8_BLOCK = (128, 128)
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
FORMATS = ("fp8", "fp4")

# Which of v4jax's weights the released checkpoints store quantized, and how (spec 8): a regex on
# the leaf path inside a layer or the MTP block, its format and its layout. Everything else (the
# embedding, the head, norms, compressors, the indexer's weights_proj, the router, mHC) is
# bf16 / fp32 in the checkpoint. QAT, the export and the planner's inference memory read this table.
WEIGHT_FORMATS = (
    (r"(^|/)attn/(wq_a|wq_b|wkv|wo_b)/kernel$", "fp8", "t"),
    (r"(^|/)attn/wo_a$", "fp8", "wo_a"),
    (r"(^|/)attn/indexer/wq_b/kernel$", "fp8", "t"),
    (r"(^|/)ffn/shared_experts/w[123]/kernel$", "fp8", "t"),
    (r"(^|/)(e_proj|h_proj)/kernel$", "fp8", "t"),
    (r"(^|/)ffn/experts/w[123]$", "fp4", "t"),
)
# QAT modes (``V4Config.qat``) -> the formats whose weights are fake-quantized in the forward
QAT_FORMATS = {"none": (), "fp4_experts": ("fp4",), "fp4_experts+fp8": ("fp4", "fp8")}
assert tuple(QAT_FORMATS) == QAT_MODES, "v4jax.config.QAT_MODES and QAT_FORMATS must name the same modes"


def weight_format(path: str) -> tuple[str, str] | None:
    """``(fmt, layout)`` of the leaf at ``path`` (``"params/layers_3/attn/wo_a"``, stacked or
    not) in the released checkpoints, or None when it is stored in bf16 / fp32."""
    for pat, fmt, layout in WEIGHT_FORMATS:
        if re.search(pat, path):
            return fmt, layout
    return None


def qat_format(mode: str, fmt: str | None) -> str | None:
    """The format a weight of checkpoint format ``fmt`` is fake-quantized to under QAT ``mode``."""
    if mode not in QAT_FORMATS:
        raise ValueError(f"unknown QAT mode {mode!r} (expected one of {QAT_MODES})")
    return fmt if fmt in QAT_FORMATS[mode] else None
LAYOUTS = ("t", "wo_a")   # ours = checkpoint with the last two axes swapped | the grouped output (spec 3.6)


@struct.dataclass
class QuantizedWeight:
    """A quantized weight in the checkpoint layout (see the module docstring).

    ``layout``: how v4jax's array is made from the checkpoint's ``[..., out, in]``: ``"t"`` swaps
    the last two axes (linears, experts), ``"wo_a"`` reshapes ``[..., g*d_g, in]`` to
    ``[..., g, in, d_g]`` (``groups = g``)."""

    codes: jax.Array
    scale: jax.Array
    fmt: str = struct.field(pytree_node=False)
    layout: str = struct.field(pytree_node=False, default="t")
    groups: int = struct.field(pytree_node=False, default=1)
    block: tuple[int, int] = struct.field(pytree_node=False, default=FP8_BLOCK)   # fp8 tile (rows, cols)

    @property
    def checkpoint_shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape in the checkpoint layout ``[..., out, in]``."""
        s = tuple(self.codes.shape)
        return s[:-1] + (2 * s[-1],) if self.fmt == "fp4" else s

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``dequantize(self)`` (v4jax's layout)."""
        return ours_shape(self.checkpoint_shape, self.layout, self.groups)

    @property
    def nbytes(self) -> int:
        return int(self.codes.size * self.codes.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def ours_shape(ckpt_shape, layout: str, groups: int = 1) -> tuple[int, ...]:
    *lead, out, inn = ckpt_shape
    if layout == "t":
        return (*lead, inn, out)
    if layout == "wo_a":
        return (*lead, groups, inn, out // groups)
    raise ValueError(f"unknown quantized layout {layout!r} (expected one of {LAYOUTS})")


def to_ours(x: jax.Array, layout: str, groups: int = 1) -> jax.Array:
    """Checkpoint layout ``[..., out, in]`` -> v4jax's (see ``QuantizedWeight``)."""
    if layout == "t":
        return jnp.swapaxes(x, -1, -2)
    if layout == "wo_a":
        *lead, out, inn = x.shape
        return jnp.swapaxes(x.reshape(*lead, groups, out // groups, inn), -1, -2)
    raise ValueError(f"unknown quantized layout {layout!r} (expected one of {LAYOUTS})")


def to_checkpoint(w: jax.Array, layout: str) -> jax.Array:
    """Inverse of ``to_ours``."""
    if layout == "t":
        return jnp.swapaxes(w, -1, -2)
    if layout == "wo_a":
        *lead, g, inn, dg = w.shape
        return jnp.swapaxes(w, -1, -2).reshape(*lead, g * dg, inn)
    raise ValueError(f"unknown quantized layout {layout!r} (expected one of {LAYOUTS})")


def _expand(scale: jax.Array, reps: tuple[int, int], shape: tuple[int, int]) -> jax.Array:
    """Per-block scales ``[..., so, si]`` -> per-element ``[..., out, in]`` (edge blocks cut)."""
    s = jnp.repeat(scale, reps[0], axis=-2) if reps[0] > 1 else scale
    s = jnp.repeat(s, reps[1], axis=-1) if reps[1] > 1 else s
    return s[..., :shape[0], :shape[1]]


def unpack_fp4(codes: jax.Array) -> jax.Array:
    """``uint8 [..., n/2]`` (two e2m1 codes per byte, low nibble first) -> float32 ``[..., n]``.
    The nibbles are bit-cast to ``float4_e2m1fn`` and converted (on XLA:CPU 3.6x faster than
    looking the 16 values up in a table: 0.96 vs 3.50 ms for [16, 512, 256] codes)."""
    b = codes.astype(jnp.uint8)
    nib = jnp.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    return jax.lax.bitcast_convert_type(nib.astype(jnp.uint4), jnp.float4_e2m1fn).astype(jnp.float32)


def _scaled(x: jax.Array, scale: jax.Array, block: tuple[int, int]) -> jax.Array:
    """``x [..., out, in]`` times one scale per ``block`` tile. When the tiles divide the matrix
    this is a broadcast multiply on a ``[..., so, bo, si, bi]`` view (one fusion, no per-element
    scale array); partial edge tiles repeat the scales and cut them."""
    (out, inn), (bo, bi) = x.shape[-2:], block
    so, si = scale.shape[-2:]
    if out == so * bo and inn == si * bi:
        lead = x.shape[:-2]
        y = x.reshape(*lead, so, bo, si, bi) * scale[..., :, None, :, None]
        return y.reshape(x.shape)
    return x * _expand(scale, block, (out, inn))


def dequantize_checkpoint(q: QuantizedWeight) -> jax.Array:
    """float32 values in the checkpoint layout ``[..., out, in]`` (exact: codes times powers of two)."""
    scale = q.scale.astype(jnp.float32)
    if q.fmt == "fp8":
        return _scaled(q.codes.astype(jnp.float32), scale, q.block)
    if q.fmt == "fp4":
        return _scaled(unpack_fp4(q.codes), scale, (1, FP4_BLOCK))
    raise ValueError(f"unknown weight format {q.fmt!r} (expected one of {FORMATS})")


def dequantize(q, dtype=jnp.float32) -> jax.Array:
    """A weight as v4jax's modules use it: a ``QuantizedWeight`` dequantized (in float32, then
    cast) into v4jax's layout; a plain array is only cast."""
    if not isinstance(q, QuantizedWeight):
        return q.astype(dtype)
    return to_ours(dequantize_checkpoint(q), q.layout, q.groups).astype(dtype)


def _pow2_scale(amax: jax.Array, fmax: float) -> jax.Array:
    """Smallest power of two ``s`` with ``amax / s <= fmax`` (exact: ``frexp``, not ``log2``)."""
    r = jnp.maximum(amax, AMAX_FLOOR) / fmax
    m, e = jnp.frexp(r)                      # r = m 2^e, m in [0.5, 1)
    e = jnp.where(m == 0.5, e - 1, e)        # r is a power of two: 2^(e-1)
    return jnp.ldexp(jnp.ones_like(r), e)


def _fp4_codes(y: jax.Array) -> jax.Array:
    """float32 values in [-6, 6] -> their e2m1 codes (round to nearest even), uint8 in [0, 16)."""
    v = y.astype(jnp.float4_e2m1fn).astype(jnp.float32)
    mag = jnp.abs(v)
    idx = sum((mag >= t).astype(jnp.uint8) for t in FP4_VALUES[1:8])
    return idx + jnp.where(jnp.signbit(v) & (idx > 0), jnp.uint8(8), jnp.uint8(0))   # no negative zero


def quantize_checkpoint(x: jax.Array, fmt: str, layout: str = "t", groups: int = 1,
                        block: tuple[int, int] = FP8_BLOCK) -> QuantizedWeight:
    """float values in the checkpoint layout ``[..., out, in]`` -> ``QuantizedWeight``."""
    x = x.astype(jnp.float32)
    *lead, out, inn = x.shape
    if fmt == "fp8":
        bo, bi = block
        so, si = -(-out // bo), -(-inn // bi)
        pad = [(0, 0)] * len(lead) + [(0, so * bo - out), (0, si * bi - inn)]
        blocks = jnp.pad(jnp.abs(x), pad).reshape(*lead, so, bo, si, bi)
        scale = _pow2_scale(jnp.max(blocks, axis=(-3, -1)), FP8_MAX)         # [..., so, si]
        codes = (x / _expand(scale, (bo, bi), (out, inn))).astype(jnp.float8_e4m3fn)
        return QuantizedWeight(codes, scale.astype(jnp.float8_e8m0fnu), "fp8", layout, groups, (bo, bi))
    if fmt == "fp4":
        if inn % FP4_BLOCK:
            raise ValueError(f"FP4 quantization needs the input dim ({inn}) to be a multiple of {FP4_BLOCK}")
        blocks = x.reshape(*lead, out, inn // FP4_BLOCK, FP4_BLOCK)
        scale = _pow2_scale(jnp.max(jnp.abs(blocks), axis=-1), FP4_MAX)      # [..., out, in/32]
        c = _fp4_codes((blocks / scale[..., None]).reshape(x.shape))
        packed = c[..., 0::2] | (c[..., 1::2] << 4)
        return QuantizedWeight(packed.astype(jnp.uint8), scale.astype(jnp.float8_e8m0fnu), "fp4", layout, groups)
    raise ValueError(f"unknown weight format {fmt!r} (expected one of {FORMATS})")


def quantize(w: jax.Array, fmt: str, layout: str = "t", groups: int = 1) -> QuantizedWeight:
    """A weight in v4jax's layout -> ``QuantizedWeight`` (the official rounding)."""
    return quantize_checkpoint(to_checkpoint(w, layout), fmt, layout, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def fake_quantize(w: jax.Array, fmt: str, layout: str = "t", groups: int = 1) -> jax.Array:
    """``dequantize(quantize(w))`` in ``w``'s dtype, with a straight-through gradient (QAT, spec 8:
    "FP32 master weights are quantised to FP4 ... with a straight-through gradient").

    A ``custom_vjp`` rather than ``w + stop_gradient(q(w) - w)``: that sum can be one ulp off
    ``q(w)``, and the forward must equal the exported checkpoint's bit for bit. Not qwix 0.1.8:
    its QAT rules rewrite the model's ``dot_general`` / ``ragged_dot`` with its own scales; the
    MX formats (power-of-two scales, V4's) fail on ``ragged_dot`` ("Format mxfp4 requires
    ``tiled_axes``", jax_ecosystem.md 8), and its ``float4_e2m1fn`` tile-32 form does not use
    power-of-two e8m0 scales, so a QAT forward would not match the official checkpoint format."""
    return dequantize(quantize(w, fmt, layout, groups), w.dtype)


def _fq_fwd(w, fmt, layout, groups):
    return fake_quantize(w, fmt, layout, groups), None


def _fq_bwd(fmt, layout, groups, _, g):
    return (g,)


fake_quantize.defvjp(_fq_fwd, _fq_bwd)


def take(q, idx: jax.Array):
    """Rows ``idx`` (in bounds) of the leading (expert) axis of a weight, quantized or not (codes
    and scales together: only the selected experts' bytes are read)."""
    get = lambda a: a.at[idx].get(mode="promise_in_bounds")
    if isinstance(q, QuantizedWeight):
        return q.replace(codes=get(q.codes), scale=get(q.scale))
    return get(q)


__all__ = ["QuantizedWeight", "is_quantized", "dequantize", "dequantize_checkpoint", "quantize",
           "quantize_checkpoint", "fake_quantize", "unpack_fp4", "take", "to_ours", "to_checkpoint", "ours_shape",
           "FP8_BLOCK", "FP4_BLOCK", "FP4_VALUES", "FORMATS"]
