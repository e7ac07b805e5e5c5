"""Linear layers whose parameters carry logical axis names (MaxText style), mapped to a mesh by
``v4jax.sharding.RULES``. Kernels are stored ``[in, out]`` (checkpoints store ``[out, in]``)."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.layers.quantized import dequantize, fake_quantize, is_quantized

default_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
                    axes: Sequence[str | None], dtype=jnp.float32) -> jnp.ndarray:
    """Declare a parameter annotated with logical axis names; returns the raw array."""
    boxed_init = nn.with_logical_partitioning(init, tuple(axes))
    return module.param(name, boxed_init, tuple(shape), dtype)


def weight_param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
                 dtype=jnp.float32, *, fake_quant: str | None = None, layout: str = "t", groups: int = 1):
    """``param_with_axes`` for a matrix the released checkpoints store quantized (spec 8).

    Returns the stored ``QuantizedWeight`` as it is when the variables hold one (native weights:
    ``v4jax.load_hf(path, weights="native")``; the caller dequantizes, see
    ``v4jax.layers.quantized.dequantize``), else the array, rounded through ``fake_quant``
    ("fp8" / "fp4", QAT: ``V4Config.qat``) with a straight-through gradient when that is set.
    (Flax's ``self.param`` would compare the packed codes' shape with the kernel's, so a stored
    quantized weight is read with ``get_variable``; its logical shape is checked here.)"""
    if module.has_variable("params", name):
        v = module.get_variable("params", name)
        if is_quantized(v):
            if tuple(v.shape) != tuple(shape):
                raise ValueError(f"{'/'.join(module.path)}/{name}: quantized weight of shape {v.shape}, "
                                 f"the model expects {tuple(shape)}")
            return v
    w = param_with_axes(module, name, init, shape, axes, dtype)
    return w if fake_quant is None else fake_quantize(w, fake_quant, layout, groups)


class Linear(nn.Module):
    """``y = x @ W`` with ``W: [in, out]``; computed in ``dtype`` with fp32 accumulation.
    ``fake_quant``: QAT format of this weight ("fp8" / "fp4", ``weight_param``); the kernel may
    also be stored quantized (native weights), dequantized here inside the compiled program."""

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = default_init
    fake_quant: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = weight_param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes,
                         self.param_dtype, fake_quant=self.fake_quant)
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), dequantize(w, self.dtype)).astype(self.dtype)


def silu(x: jnp.ndarray) -> jnp.ndarray:
    return x * jax.nn.sigmoid(x)
