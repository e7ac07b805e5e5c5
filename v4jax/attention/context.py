"""The per-call context of a whole-sequence forward pass, one small struct instead of keyword flags.

``segment_ids [B, T]`` (int, optional): packed documents (training); no window key, compressed
entry or compression block crosses a document; 0 marks padding.
``dense_attention`` (bool or traced scalar bool, optional): CSA attends to every visible entry
instead of the indexer's top-k (the dense curriculum stages); a traced value switches without a
recompile. None = sparse (top-k), as at inference.
``indexer_loss`` (static bool): CSA layers feed their indexer detached inputs and report the
indexer KL (``v4jax.attention.indexer_loss``).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class SeqContext:
    segment_ids: jnp.ndarray | None = None
    dense_attention: Any = None
    indexer_loss: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class IndexerStats:
    """A layer's indexer KL summed over its counted queries, and their number (both fp32 scalars;
    zero for layers without an indexer or when ``indexer_loss`` is off)."""

    kl: jnp.ndarray
    count: jnp.ndarray

    @classmethod
    def zero(cls) -> "IndexerStats":
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
