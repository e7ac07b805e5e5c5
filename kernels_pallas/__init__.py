"""Pallas kernels for the compressed sparse attention hot path (TPU via Mosaic, GPU via Triton,
CPU in interpret mode), each beside its pure-jnp reference built on the model's oracles
(``v4jax/attention/core.py``, ``indexer.py``, ``compressor.py``).

* ``sparse_attention``      CSA: sliding window + per-query top-k compressed entries + sink.
* ``compressed_attention``  HCA / dense CSA / window-only: window + all visible entries + sink.
* ``indexer_scores``        lightning-indexer scores with the visibility mask (-inf).
* ``indexer_topk``          top-k of those scores, -1 for picks that are not visible.

All are differentiable (custom_vjp with Pallas backward kernels) except ``indexer_topk``.
The backend follows ``jax.default_backend()`` (``backend=`` / ``interpret=`` override it).
"""

from kernels_pallas.compressed_attention import compressed_attention, compressed_attention_reference
from kernels_pallas.indexer import indexer_scores, indexer_scores_reference, indexer_topk, indexer_topk_reference
from kernels_pallas.sparse_attention import sparse_attention, sparse_attention_reference

__all__ = [
    "sparse_attention", "sparse_attention_reference",
    "compressed_attention", "compressed_attention_reference",
    "indexer_scores", "indexer_scores_reference", "indexer_topk", "indexer_topk_reference",
]
