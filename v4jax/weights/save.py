"""Write Flax variables as an official-naming DeepSeek-V4 checkpoint (spec 3.7, 6, 8).

``config.json`` (``V4Config.to_json``: transformers keys plus the official ones) and either one
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` shards with
``model.safetensors.index.json``. Tensors are converted to the checkpoint layout and written one
at a time (per expert for the stacked experts), so the host never holds a second copy of the model.
The spec-8 fp32 islands (mHC parameters, ``attn_sink``, ``ape``, the router bias) stay float32
when ``dtype="bfloat16"``; ``tid2eid`` is int32. ``load_variables(save_official(v, cfg, p), cfg)``
returns ``v`` bit for bit (float32, or bfloat16 variables saved as bfloat16 or float32).
"""

from __future__ import annotations

import glob
import os

import flax.linen as nn
import flax.traverse_util as tu
import ml_dtypes
import numpy as np

from v4jax.config import V4Config
from v4jax.model.layout import unstack_variables
from v4jax.weights import naming
from v4jax.weights.load import CheckpointError, expected_tree
from v4jax.weights.safetensors_io import PendingTensor, write_checkpoint

_OUT_DTYPES = {"float32": np.dtype(np.float32), "fp32": np.dtype(np.float32),
               "bfloat16": np.dtype(ml_dtypes.bfloat16), "bf16": np.dtype(ml_dtypes.bfloat16)}
_FP32_LEAVES = ("hc_attn/", "hc_ffn/", "hc_head/", "attn_sink", "/ape", "gate/bias")


def _leaf_dtype(path: str, layout: str, out_dt: np.dtype) -> np.dtype:
    if layout == "int":
        return np.dtype(np.int32)
    if path.startswith("buffers/") or any(k in path for k in _FP32_LEAVES):
        return np.dtype(np.float32)
    return out_dt


def save_official(variables: dict, cfg: V4Config, path, dtype: str = "float32",
                  shard_bytes: int | None = None) -> str:
    """Write ``variables`` (``{"params", "buffers"}`` of ``Transformer(cfg)``, numpy or jax arrays,
    boxed or not) to directory ``path`` in the official naming. ``dtype``: ``"float32"`` or
    ``"bfloat16"`` for the weights. ``shard_bytes``: split into shards of at most that many bytes
    (a tensor is never split). Returns ``path``."""
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"save_official: dtype must be one of {sorted(_OUT_DTYPES)}, got {dtype!r}")
    out_dt = _OUT_DTYPES[dtype]
    flat = tu.flatten_dict(unstack_variables(cfg, nn.meta.unbox(dict(variables))), sep="/")
    expected = expected_tree(cfg)
    extra, absent = sorted(set(flat) - set(expected)), sorted(set(expected) - set(flat))
    if extra or absent:
        raise CheckpointError(f"variables do not match the config: unexpected {extra[:5]}, missing {absent[:5]}")
    bad = [(k, tuple(flat[k].shape), tuple(v.shape)) for k, v in expected.items() if tuple(flat[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"variables have wrong shapes (path, got, expected): {bad[:5]}")

    pending = []
    for name, p in naming.official_entries(expected, cfg.n_layers, cfg.n_mtp_layers):
        leaf = flat[p.path]
        dt = _leaf_dtype(p.path, p.layout, out_dt)
        tshape = expected[p.path].shape
        shape = naming.source_shape(p.layout, tshape)

        def produce(leaf=leaf, p=p):
            x = np.asarray(leaf[p.expert] if p.expert is not None else leaf)
            return naming.to_checkpoint(p.layout, x)

        pending.append(PendingTensor(name, dt, shape, produce))
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for stale in ["model.safetensors", "model.safetensors.index.json",
                  *glob.glob(os.path.join(path, "model-*-of-*.safetensors"))]:
        if os.path.exists(os.path.join(path, stale)):  # a previous save must not shadow this one
            os.remove(os.path.join(path, stale))
    write_checkpoint(path, pending, shard_bytes)
    cfg.to_json(os.path.join(path, "config.json"))
    return path
