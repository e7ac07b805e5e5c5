"""DeepSeekMoE (spec 5): sqrt-softplus router, aux-loss-free bias, hash routing, clamped SwiGLU
experts stacked as ``[experts, ...]``, shared expert, sequence-wise balance statistics."""
