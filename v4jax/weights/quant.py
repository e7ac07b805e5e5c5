"""Dequantization of released DeepSeek-V4 weights (spec 8), in numpy, one tensor at a time.

* FP8: ``float8_e4m3fn`` weight ``[out, in]`` times a block scale ``[ceil(out/bo), ceil(in/bi)]``
  (128 x 128 in the released checkpoints; edge blocks are partial).
* FP4 (MXFP4, routed experts): ``int8``/``uint8`` ``[out, in/2]`` holding two e2m1 codes per byte,
  LOW nibble first; code bit 3 is the sign, bits 0-2 index ``0, .5, 1, 1.5, 2, 3, 4, 6``; times a
  scale ``[out, in/32]`` (one per 1 x 32 block).
* Scales: ``float8_e8m0fnu`` (ue8m0), raw ``uint8`` exponents (``2**(x-127)``, 255 = NaN), or any
  float dtype (float32 / bfloat16 / float16).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
PREFERRED_BLOCKS = (128, 64, 32, 256, 16, 512)


def scale_to_float32(scale: np.ndarray) -> np.ndarray:
    """A scale tensor in any stored format -> float32."""
    dt = scale.dtype
    if dt == np.dtype(ml_dtypes.float8_e8m0fnu):
        return scale.astype(np.float32)
    if dt == np.uint8:  # ue8m0 exponent bytes
        out = np.ldexp(np.float32(1.0), scale.astype(np.int32) - 127).astype(np.float32)
        return np.where(scale == 255, np.float32(np.nan), out)
    if np.issubdtype(dt, np.integer):
        raise ValueError(f"unsupported integer scale dtype {dt}")
    return scale.astype(np.float32)


def infer_block(dim: int, n_scales: int, preferred: int | None = None) -> int:
    """Block length b along one axis with ``ceil(dim / b) == n_scales``: ``preferred`` (the
    config's ``weight_block_size``) if it fits, else the first fitting power of two in
    ``PREFERRED_BLOCKS`` (128 first). Raises ValueError when none fits (no guessing odd sizes)."""
    for b in ((preferred,) if preferred else ()) + PREFERRED_BLOCKS:
        if -(-dim // b) == n_scales:
            return b
    raise ValueError(f"{n_scales} scales do not tile an axis of length {dim} with a block in "
                     f"{((preferred,) if preferred else ()) + PREFERRED_BLOCKS}")


def dequant_fp8_block(w: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None = None) -> np.ndarray:
    """``w [out, in]`` (FP8) x block scales ``[so, si]`` -> float32 ``[out, in]``.
    ``block`` (rows, cols) is inferred from the shapes when None (128 preferred)."""
    if w.ndim != 2 or scale.ndim != 2:
        raise ValueError(f"FP8 block dequant needs 2-D weight and scale, got {w.shape} and {scale.shape}")
    out_f, in_f = w.shape
    s = scale_to_float32(scale)
    pr, pc = block if block is not None else (None, None)
    br = infer_block(out_f, s.shape[0], pr)
    bc = infer_block(in_f, s.shape[1], pc)
    y = w.astype(np.float32)
    col_scale_rows = np.repeat(s, bc, axis=1)[:, :in_f]  # [so, in]
    for i in range(s.shape[0]):  # row blocks: no full-size scale temporary
        y[i * br:(i + 1) * br] *= col_scale_rows[i]
    return y


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """``[..., n/2]`` int8/uint8 (two e2m1 codes per byte, low nibble first) -> float32 ``[..., n]``."""
    b = packed.view(np.uint8)
    out = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.float32)
    out[..., 0::2] = FP4_VALUES[b & 0x0F]
    out[..., 1::2] = FP4_VALUES[b >> 4]
    return out


def dequant_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``packed [out, in/2]`` x ``scale [out, in/bs]`` (bs = 32 in the released weights) -> float32
    ``[out, in]``."""
    v = unpack_fp4(packed)
    s = scale_to_float32(scale)
    if s.ndim != v.ndim or s.shape[:-1] != v.shape[:-1] or s.shape[-1] == 0 or v.shape[-1] % s.shape[-1]:
        raise ValueError(f"FP4 scale shape {scale.shape} does not tile weight shape {v.shape}")
    bs = v.shape[-1] // s.shape[-1]
    v = v.reshape(*s.shape, bs) * s[..., None]
    return v.reshape(*s.shape[:-1], -1)
