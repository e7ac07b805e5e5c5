"""Partial interleaved (GPT-J style) RoPE on the trailing ``rope_dim`` dims, with YaRN (spec 2).

A head vector is ``[nope | rope]``; inside the rope slice the pairs ``(x_2j, x_2j+1)`` rotate by
``pos * f_j``. ``inverse=True`` rotates by ``-pos * f_j`` (the output de-rotation of spec 3.5).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from v4jax.config import RopeSpec


def inv_freq(spec: RopeSpec) -> jnp.ndarray:
    """Per-pair frequencies ``f_j`` ``[rope_dim // 2]`` in fp32, YaRN-corrected when the spec says so."""
    r = spec.rope_dim
    f = 1.0 / (np.float32(spec.theta) ** (np.arange(0, r, 2, dtype=np.float32) / np.float32(r)))
    if spec.uses_yarn:
        def corr_dim(n_rot: float) -> float:
            return r * math.log(spec.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(spec.theta))

        lo = max(math.floor(corr_dim(spec.beta_fast)), 0)
        hi = min(math.ceil(corr_dim(spec.beta_slow)), r - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(r // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
        f = (f / np.float32(spec.yarn_factor)) * ramp + f * (1 - ramp)
    return jnp.asarray(f, jnp.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, spec: RopeSpec, inverse: bool = False) -> jnp.ndarray:
    """Rotate the trailing ``spec.rope_dim`` dims of ``x``.

    x: ``[B, T, D]`` or ``[B, T, H, D]``; positions: ``[T]`` or ``[B, T]`` (integer).
    """
    r = spec.rope_dim
    ang = positions.astype(jnp.float32)[..., None] * inv_freq(spec)  # [(B,) T, r/2]
    if ang.ndim == 2:
        ang = ang[None]
    if x.ndim == 4:
        ang = ang[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if inverse:
        sin = -sin
    nope, rot = x[..., :-r], x[..., -r:].astype(jnp.float32)
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    rot = jnp.stack([y0, y1], axis=-1).reshape(rot.shape).astype(x.dtype)
    return jnp.concatenate([nope, rot], axis=-1)
