"""Pallas kernels for the compressed sparse attention hot path (TPU via Mosaic, GPU via Triton,
CPU in interpret mode), each beside its self-contained pure-jnp reference (``*/reference.py``:
the plain dense masked math, fp32). A leaf library: it imports only jax and numpy, never the
model; ``tests/test_kernel_references.py`` checks the references against the model's oracles.

* ``sparse_attention``      CSA: sliding window + per-query top-k compressed entries + sink.
* ``compressed_attention``  HCA / dense CSA / window-only: window + all visible entries + sink.
* ``indexer_scores``        lightning-indexer scores with the visibility mask (-inf).
* ``indexer_topk``          top-k of those scores, -1 for picks that are not visible.

All are differentiable (custom_vjp with Pallas backward kernels) except ``indexer_topk``.
The backend follows ``jax.default_backend()`` (``backend=`` / ``interpret=`` override it).

Layout: ``attention_core/`` (the two attention kernels' shared implementation: ``plan.py``
config and block planning, ``portable.py`` Triton / interpreter kernels, ``tpu.py`` Mosaic
kernels, ``vjp.py`` custom_vjp and entry), ``indexer/kernel.py``, ``_common.py`` (backend
resolution and block math shared by all kernels), ``_testing.py`` (test helpers),
``tpu_aot.py`` (ahead-of-time lowering / libtpu compile checks).
"""

from kernels_pallas.compressed_attention import compressed_attention, compressed_attention_reference
from kernels_pallas.indexer import indexer_scores, indexer_scores_reference, indexer_topk, indexer_topk_reference
from kernels_pallas.sparse_attention import sparse_attention, sparse_attention_reference

__all__ = [
    "sparse_attention", "sparse_attention_reference",
    "compressed_attention", "compressed_attention_reference",
    "indexer_scores", "indexer_scores_reference", "indexer_topk", "indexer_topk_reference",
]
