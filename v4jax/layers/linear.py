"""Linear layers whose parameters carry logical axis names (MaxText style), mapped to a mesh by
``v4jax.sharding.RULES``. Kernels are stored ``[in, out]`` (checkpoints store ``[out, in]``)."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

default_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
                    axes: Sequence[str | None], dtype=jnp.float32) -> jnp.ndarray:
    """Declare a parameter annotated with logical axis names; returns the raw array."""
    boxed_init = nn.with_logical_partitioning(init, tuple(axes))
    return module.param(name, boxed_init, tuple(shape), dtype)


class Linear(nn.Module):
    """``y = x @ W`` with ``W: [in, out]``; computed in ``dtype`` with fp32 accumulation."""

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = default_init

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = param_with_axes(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes,
                            self.param_dtype)
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), w.astype(self.dtype)).astype(self.dtype)


def silu(x: jnp.ndarray) -> jnp.ndarray:
    return x * jax.nn.sigmoid(x)
