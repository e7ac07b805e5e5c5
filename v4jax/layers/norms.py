"""RMSNorm, weighted and unweighted (spec section 2). Computed in fp32, cast back to the input dtype."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from v4jax.layers.linear import param_with_axes


def rms_factor(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """The RMSNorm row factor ``1 / sqrt(mean(x^2) + eps)`` over the last axis, fp32, ``[..., 1]``."""
    xf = x.astype(jnp.float32)
    return jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps))


def rms_normalize(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Unweighted RMSNorm over the last axis, in fp32: ``x / sqrt(mean(x^2) + eps)``."""
    return x.astype(jnp.float32) * rms_factor(x, eps)


class RMSNorm(nn.Module):
    """Weighted RMSNorm ``w * x / rms(x)``; weight ``[features]`` (checkpoint name ``<name>.weight``)."""

    features: int
    eps: float = 1e-6
    axis_name: str | None = "norm"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = param_with_axes(self, "scale", nn.initializers.ones, (self.features,), (self.axis_name,))
        return (rms_normalize(x, self.eps) * w.astype(jnp.float32)).astype(x.dtype)
