"""Write Flax variables as an official-naming DeepSeek-V4 checkpoint (spec 3.7, 6, 8).

``config.json`` (``V4Config.to_json``: transformers keys plus the official ones) and either one
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` shards with
``model.safetensors.index.json``. Tensors are converted to the checkpoint layout and written one
at a time (per expert for the stacked experts), so the host never holds a second copy of the model.
The spec-8 fp32 islands (mHC parameters, ``attn_sink``, ``ape``, the router bias) stay float32
when ``dtype="bfloat16"``; ``tid2eid`` is int32. ``load_variables(save_official(v, cfg, p), cfg)``
returns ``v`` bit for bit (float32, or bfloat16 variables saved as bfloat16 or float32).

``quantize="official"`` writes the released checkpoints' storage (spec 8): every weight that
``v4jax.layers.quantized.WEIGHT_FORMATS`` names as FP8 becomes ``float8_e4m3fn`` codes with
128 x 128 ue8m0 block scales (``.scale``), the routed experts FP4 e2m1 packed two per byte
(``int8``, low nibble first) with 1 x 32 ue8m0 scales, and ``config.json`` gets the release's
``quantization_config`` and ``expert_dtype: "fp4"``. The rounding is ``quantized.quantize``,
the one QAT's forward uses (``V4Config.qat``), so a QAT-trained model exported this way and
loaded with ``weights="native"`` (or dequantized) computes the QAT forward's values. Native
(``QuantizedWeight``) variables are written as they are, bit for bit. The other tensors are
written in ``dtype`` (the release: ``"bfloat16"``).
"""

from __future__ import annotations

import glob
import json
import os

import flax.linen as nn
import flax.traverse_util as tu
import jax
import ml_dtypes
import numpy as np

from v4jax.config import V4Config
from v4jax.layers import quantized as qw
from v4jax.model.layout import unstack_variables
from v4jax.weights import naming
from v4jax.weights.load import CheckpointError, expected_tree
from v4jax.weights.safetensors_io import PendingTensor, write_checkpoint

_OUT_DTYPES = {"float32": np.dtype(np.float32), "fp32": np.dtype(np.float32),
               "bfloat16": np.dtype(ml_dtypes.bfloat16), "bf16": np.dtype(ml_dtypes.bfloat16)}
QUANTIZE = (None, "official")
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                       "weight_block_size": list(qw.FP8_BLOCK)}
_FP32_LEAVES = ("hc_attn/", "hc_ffn/", "hc_head/", "attn_sink", "/ape", "gate/bias")


def _leaf_dtype(path: str, layout: str, out_dt: np.dtype) -> np.dtype:
    if layout == "int":
        return np.dtype(np.int32)
    if path.startswith("buffers/") or any(k in path for k in _FP32_LEAVES):
        return np.dtype(np.float32)
    return out_dt


def _quantized_entries(name: str, leaf, p: naming.Placement, fmt: str, layout: str) -> list[PendingTensor]:
    """The ``.weight`` and ``.scale`` tensors of one quantized matrix (quantized once, lazily)."""
    memo = {}

    def q():
        if "q" not in memo:
            x = leaf
            if p.expert is not None:
                x = (x.replace(codes=np.asarray(x.codes)[p.expert], scale=np.asarray(x.scale)[p.expert])
                     if qw.is_quantized(x) else np.asarray(x)[p.expert])
            if not qw.is_quantized(x):
                groups = x.shape[-3] if layout == "wo_a" else 1
                x = _quantize_jit(np.asarray(x, np.float32), fmt, layout, groups)
            memo["q"] = (np.asarray(x.codes), np.asarray(x.scale))
        return memo["q"]

    def weight():
        c = q()[0]
        return c.view(np.int8) if c.dtype == np.uint8 else c   # FP4 pairs are stored as int8

    def scale():
        _, s = memo.pop("q") if "q" in memo else q()
        return s.astype(ml_dtypes.float8_e8m0fnu) if s.dtype != np.dtype(ml_dtypes.float8_e8m0fnu) else s

    tshape = naming.source_shape(p.layout, tuple(leaf.shape))          # [out, in]
    if fmt == "fp8":
        wdt, wshape = np.dtype(ml_dtypes.float8_e4m3fn), tshape
        sshape = tuple(-(-n // b) for n, b in zip(tshape, qw.FP8_BLOCK))
        if qw.is_quantized(leaf) and leaf.block != qw.FP8_BLOCK:
            sshape = tuple(leaf.scale.shape[-2:])
    else:
        wdt, wshape, sshape = np.dtype(np.int8), tshape[:-1] + (tshape[-1] // 2,), tshape[:-1] + (tshape[-1] // qw.FP4_BLOCK,)
    base = name[: -len(".weight")]
    return [PendingTensor(name, wdt, wshape, weight),
            PendingTensor(base + ".scale", np.dtype(ml_dtypes.float8_e8m0fnu), sshape, scale)]


_quantize_jit = jax.jit(qw.quantize, static_argnums=(1, 2, 3))


def save_official(variables: dict, cfg: V4Config, path, dtype: str = "float32",
                  shard_bytes: int | None = None, quantize: str | None = None) -> str:
    """Write ``variables`` (``{"params", "buffers"}`` of ``Transformer(cfg)``, numpy or jax arrays,
    boxed or not, native ``QuantizedWeight`` leaves allowed) to directory ``path`` in the official
    naming. ``dtype``: ``"float32"`` or ``"bfloat16"`` for the weights that are not quantized.
    ``quantize``: None (everything in ``dtype``; native weights are dequantized) or
    ``"official"`` (FP8 / FP4 as released: see the module docstring). ``shard_bytes``: split into
    shards of at most that many bytes (a tensor is never split). Returns ``path``."""
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"save_official: dtype must be one of {sorted(_OUT_DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"save_official: quantize must be one of {QUANTIZE}, got {quantize!r}")
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
        wf = qw.weight_format(p.path)
        if quantize == "official" and wf is not None:
            pending.extend(_quantized_entries(name, leaf, p, *wf))
            continue
        if qw.is_quantized(leaf):       # a native weight written in ``dtype``
            leaf = qw.dequantize(leaf, np.float32)
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
    d = cfg.to_hf_dict()
    if quantize == "official":
        d.update(quantization_config=dict(QUANTIZATION_CONFIG), expert_dtype="fp4", torch_dtype="bfloat16")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    return path
