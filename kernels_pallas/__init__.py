"""Pallas kernels for the compressed sparse attention hot path (TPU via Mosaic, GPU via Triton /
Mosaic GPU, CPU in interpret mode), each beside its pure-jnp reference in ``v4jax.attention``.

The jnp oracles they must match live in ``v4jax/attention/core.py`` (core attention with sink),
``v4jax/attention/indexer.py`` (indexer scores and top-k) and ``v4jax/attention/compressor.py``.
The kernels themselves are tracked by the Pallas issue; until then ``attention_impl="pallas"``
is rejected at model build time rather than silently falling back.
"""
