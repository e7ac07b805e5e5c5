"""Shared primitives: RMSNorm, partial interleaved RoPE with YaRN, linear layers with logical axes."""
