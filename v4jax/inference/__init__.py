"""Inference-time state (spec 3.8): fixed-shape per-layer caches and the cached ``extend`` step
that serves chunked prefill and single-token decode with one code path."""
