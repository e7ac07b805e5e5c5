"""Pure-jnp reference for ``compressed_attention`` (HCA / dense CSA / window-only), built on the
model's oracle: ``attention_reference`` with a window ``kv_mask`` and the ``visible_entries``
causality rule (plus same-segment) as ``comp_mask``."""

from __future__ import annotations

import jax.numpy as jnp

from v4jax.attention.compressor import visible_entries
from v4jax.attention.core import attention_reference

from kernels_pallas._reference_common import window_kv_mask


def compressed_attention_reference(q, kv, sink, comp, *, ratio, window, scale=None, segment_ids=None,
                                   comp_segment_ids=None, return_lse=False):
    B, T = q.shape[:2]
    kv_mask = window_kv_mask(T, window, segment_ids, B)
    N = 0 if comp is None else comp.shape[1]
    comp_mask = None
    if N > 0:
        comp_mask = jnp.broadcast_to(visible_entries(jnp.arange(T), N, ratio)[None], (B, T, N))
        if segment_ids is not None:
            comp_mask = comp_mask & (segment_ids[:, :, None] == comp_segment_ids[:, None, :])
    c = comp if N > 0 else None
    return attention_reference(q, kv, sink, window, c, comp_mask, scale=scale, kv_mask=kv_mask, return_lse=return_lse)
