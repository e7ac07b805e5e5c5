"""jnp pieces shared by the attention references: the window (and same-segment) key mask from the
model's oracle helpers."""

from __future__ import annotations

import jax.numpy as jnp

from v4jax.attention.core import window_mask


def window_kv_mask(T: int, window: int, segment_ids=None, batch: int = 1) -> jnp.ndarray:
    """``[B, T, T]`` bool: sliding-causal window, and same segment when ``segment_ids [B, T]``."""
    pos = jnp.arange(T)
    m = window_mask(pos, pos, window)[None]
    if segment_ids is None:
        return jnp.broadcast_to(m, (batch, T, T))
    return m & (segment_ids[:, :, None] == segment_ids[:, None, :])
