"""Streaming checkpoint loader: safetensors (official / transformers naming, FP8 / FP4 / bf16 /
fp32) -> Flax variables ``{"params": ..., "buffers": ...}`` of ``Transformer(cfg)``.

Spec 3.6, 3.7, 5, 6, 8, 10. The expected tree comes from ``jax.eval_shape`` of the model's init
(nothing is allocated for it). Loading runs in two passes:

1. **plan** (headers only): every tensor name is normalised through ``naming.parse``; unknown
   names, tensors the config has no place for, misshaped tensors, missing quantization scales,
   duplicates and missing tensors are all reported before any data is read;
2. **read**: file by file, tensor by tensor: read (with its scale), dequantize to fp32, convert
   the layout, cast, write into the (lazily allocated) destination leaf, drop. Per-expert
   tensors fill a preallocated ``[E, ...]`` leaf slot by slot.

MTP: a checkpoint without any ``mtp.*`` tensor loaded with ``cfg.n_mtp_layers == 1`` (every
transformers-written checkpoint) loads the main model only; the returned config then has
``n_mtp_layers = 0`` and the variables have no ``mtp_0`` subtree (a ``UserWarning`` says so;
``require_mtp=True`` raises instead). MTP tensors with ``n_mtp_layers == 0`` are ignored.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import warnings
from typing import NamedTuple

import flax.traverse_util as tu
import jax.numpy as jnp
import numpy as np

from v4jax.config import V4Config
from v4jax.model.layout import stack_variables, unstack_variables
from v4jax.params import abstract_variables
from v4jax.weights import naming, quant
from v4jax.weights.safetensors_io import SafetensorsFile, TensorInfo

INDEX_FILE = "model.safetensors.index.json"
_FP8 = ("F8_E4M3", "F8_E5M2")
_PACKED_FP4 = ("I8", "U8", "F4")
_FLOAT = ("F64", "F32", "F16", "BF16")
_INT = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")


class CheckpointError(ValueError):
    """A checkpoint does not fit the config: the message names the tensor(s) and what is wrong."""


class LoadedWeights(NamedTuple):
    """``variables, cfg = load_variables(...)``. ``cfg`` is the config the variables belong to:
    the input config, with ``n_mtp_layers = 0`` when the checkpoint had no MTP block."""

    variables: dict
    cfg: V4Config


class LoadReport(NamedTuple):
    variables: dict
    cfg: V4Config
    mtp_loaded: bool
    ignored: tuple[str, ...]  # names skipped on purpose (MTP emb/head copies, rotary tables, ...)


def load_variables(path, cfg: V4Config | None = None, dtype=None, *, require_mtp: bool = False) -> LoadedWeights:
    """Load ``path`` (a checkpoint directory, or one ``.safetensors`` file) for ``cfg`` (default:
    the directory's ``config.json``). Float params are returned as numpy arrays of ``dtype``
    (default ``cfg.param_dtype``); buffers keep the model's dtypes (``bias`` fp32, ``tid2eid``
    int32). Returns ``LoadedWeights(variables, cfg)``; see the module docstring for MTP."""
    r = load_checkpoint(path, cfg, dtype, require_mtp=require_mtp)
    return LoadedWeights(r.variables, r.cfg)


@functools.lru_cache(maxsize=8)
def _expected_tree(cfg: V4Config) -> tuple:
    return tuple(tu.flatten_dict(unstack_variables(cfg, abstract_variables(cfg)), sep="/").items())


def expected_tree(cfg: V4Config) -> dict[str, object]:
    """Flat ``{"params/layers_0/attn/wq_a/kernel": ShapeDtypeStruct}`` of ``Transformer(cfg)`` in
    the per-layer (checkpoint) layout (``jax.eval_shape`` of its init, unstacked; cached per config)."""
    return dict(_expected_tree(cfg))


def checkpoint_files(path) -> tuple[str, list[str], dict[str, str] | None]:
    """``(directory, safetensors files, weight_map or None)`` of a checkpoint path."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.dirname(path) or ".", [path], None
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            wmap = json.load(f).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = sorted(set(wmap.values()))
        for fn in files:
            if not os.path.isfile(os.path.join(path, fn)):
                raise CheckpointError(f"{index} names file {fn!r}, which does not exist")
        return path, [os.path.join(path, fn) for fn in files], wmap
    single = os.path.join(path, "model.safetensors")
    files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path!r}")
    return path, files, None


def _few(names, n=5) -> str:
    names = list(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


def _block_hint(directory: str) -> tuple[int, int] | None:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            b = (json.load(f).get("quantization_config") or {}).get("weight_block_size")
        return (int(b[0]), int(b[1])) if b else None
    except (OSError, ValueError, TypeError, IndexError):
        return None


class _Plan(NamedTuple):
    sources: dict[str, tuple[naming.Placement, ...]]  # weight name -> placements
    scales: dict[str, TensorInfo]                      # weight name -> its scale tensor
    ignored: tuple[str, ...]
    expected: dict[str, object]
    cfg: V4Config
    mtp_loaded: bool


def _plan(infos: dict[str, TensorInfo], cfg: V4Config, require_mtp: bool) -> _Plan:
    expected = expected_tree(cfg)
    sources, scale_names, ignored, unknown = {}, {}, [], []
    for name in infos:
        if naming.is_ignored(name) or (naming.is_mtp(name) and not cfg.n_mtp_layers):
            ignored.append(name)
            continue
        pl = naming.parse(name)
        if pl is not None:
            sources[name] = pl
            continue
        base = naming.scale_base(name)
        if base is not None and naming.parse(base) is not None:
            scale_names[name] = base
            continue
        unknown.append(name)
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensor name(s) match no DeepSeek-V4 weight: {_few(unknown)}")

    has_mtp = any(naming.is_mtp(n) for n in sources)
    if cfg.n_mtp_layers and not has_mtp:
        if require_mtp:
            raise CheckpointError("checkpoint has no MTP tensors (mtp.0.*) but require_mtp=True")
        warnings.warn("checkpoint has no MTP block (mtp.0.*): loading the main model only; "
                      "the returned config has n_mtp_layers=0", stacklevel=3)
        cfg = cfg.replace(n_mtp_layers=0)
        expected = {k: v for k, v in expected.items() if not k.split("/")[1].startswith("mtp_")}

    # every placement must land in the tree, exactly once
    filled: dict[str, set] = {}
    for name, pls in sources.items():
        for p in pls:
            if p.path not in expected:
                raise CheckpointError(f"tensor {name!r} maps to {p.path}, which this config does not have "
                                      f"(n_layers={cfg.n_layers}, layer_types={cfg.layer_types}, "
                                      f"n_hash_layers={cfg.n_hash_layers}, n_mtp_layers={cfg.n_mtp_layers})")
            shape = expected[p.path].shape
            slots = set(range(shape[0])) if p.layout in ("gate_half", "up_half", "stacked_t") else {p.expert}
            if p.expert is not None and not 0 <= p.expert < shape[0]:
                raise CheckpointError(f"tensor {name!r}: expert index {p.expert} >= n_routed_experts={shape[0]}")
            if filled.setdefault(p.path, set()) & slots:
                raise CheckpointError(f"tensor {name!r} fills {p.path} a second time (duplicate / alias clash)")
            filled[p.path] |= slots

    scales = {}
    for sname, base in scale_names.items():
        if base not in sources:
            raise CheckpointError(f"scale tensor {sname!r} has no weight {base!r}")
        if base in scales:
            raise CheckpointError(f"weight {base!r} has two scales: {scales[base].name!r}, {sname!r}")
        scales[base] = infos[sname]

    missing = [off for off, p in naming.official_entries(expected, cfg.n_layers, cfg.n_mtp_layers)
               if p.expert not in filled.get(p.path, ())]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {_few(missing)}")

    for name, pls in sources.items():
        _check_source(infos[name], pls, scales.get(name), expected)
    return _Plan(sources, scales, tuple(ignored), expected, cfg, cfg.n_mtp_layers > 0)


def _check_source(info: TensorInfo, pls, scale: TensorInfo | None, expected) -> None:
    p = pls[0]
    want = naming.source_shape(p.layout, expected[p.path].shape)
    got, dt, name = info.shape, info.dtype, info.name
    where = f"tensor {name!r} ({os.path.basename(info.file)}, {dt})"
    if p.layout == "int":
        if dt not in _INT:
            raise CheckpointError(f"{where}: expected an integer table for {p.path}")
        quantized = False
    elif dt in _FP8:
        quantized = True
    elif dt in _PACKED_FP4:  # two e2m1 codes per byte along the last axis
        quantized = True
        if dt != "F4" or got != want:
            got = got[:-1] + (got[-1] * 2,) if got else got
    elif dt in _FLOAT:
        quantized = False
    else:
        raise CheckpointError(f"{where}: unsupported dtype for {p.path}")
    if tuple(got) != tuple(want):
        raise CheckpointError(f"{where}: shape {list(info.shape)} does not match {p.path} "
                              f"(expected {list(want)} in checkpoint layout)")
    if quantized and scale is None:
        raise CheckpointError(f"{where} is quantized but has no companion scale ({name[:-7]}.scale)")
    if scale is not None and not quantized:
        raise CheckpointError(f"{where} is not quantized but has a scale {scale.name!r}")
    if quantized and p.layout not in ("linear", "expert", "wo_a", "copy"):
        raise CheckpointError(f"{where}: quantized packed experts are not supported")


def _materialise(f: SafetensorsFile, info: TensorInfo, scale_file, scale: TensorInfo | None, block) -> np.ndarray:
    x = f.get(info.name)
    if scale is None:
        return x
    s = scale_file.get(scale.name)
    try:
        if info.dtype in _FP8:
            return quant.dequant_fp8_block(x, s, block)
        return quant.dequant_fp4(x.reshape(x.shape[:-1] + (-1,)), s)
    except ValueError as e:
        raise CheckpointError(f"tensor {info.name!r}: cannot dequantize with scale {scale.name!r} "
                              f"{list(scale.shape)}: {e}") from None


def load_checkpoint(path, cfg: V4Config | None = None, dtype=None, *, require_mtp: bool = False) -> LoadReport:
    """``load_variables`` with the full report (``mtp_loaded``, ``ignored`` names)."""
    directory, files, wmap = checkpoint_files(path)
    if cfg is None:
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"no config given and no config.json in {directory!r}")
        cfg = V4Config.from_json(cfg_path)
    readers = {fn: SafetensorsFile(fn) for fn in files}
    try:
        infos: dict[str, TensorInfo] = {}
        for fn, r in readers.items():
            for name, info in r.tensors.items():
                if wmap is not None and os.path.join(directory, wmap.get(name, "")) != fn:
                    continue  # the index decides which file holds a name
                if name in infos:
                    raise CheckpointError(f"tensor {name!r} appears in both {infos[name].file} and {fn}")
                infos[name] = info
        if wmap is not None:
            absent = [n for n in wmap if n not in infos]
            if absent:
                raise CheckpointError(f"index names tensor(s) absent from their file: {_few(absent)}")
        plan = _plan(infos, cfg, require_mtp)
        param_dt = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
        block = _block_hint(directory)
        out: dict[str, np.ndarray] = {}
        for fn, r in readers.items():
            for name in sorted((n for n in r.tensors if n in plan.sources and infos[n].file == fn),
                               key=lambda n: r.tensors[n].begin):
                sc = plan.scales.get(name)
                x = _materialise(r, infos[name], readers[sc.file] if sc else None, sc, block)
                for p in plan.sources[name]:
                    _place(out, p, x, plan.expected[p.path], param_dt, plan.cfg.n_routed_experts, name)
                del x
        variables = stack_variables(plan.cfg, tu.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()}))
        return LoadReport(variables, plan.cfg, plan.mtp_loaded, plan.ignored)
    finally:
        for r in readers.values():
            r.close()


def _place(out, p: naming.Placement, x: np.ndarray, leaf, param_dt, n_experts: int, name: str) -> None:
    dt = param_dt if p.path.startswith("params/") else np.dtype(leaf.dtype)
    if p.layout == "int" and x.size and (x.min() < 0 or x.max() >= n_experts):
        raise CheckpointError(f"tensor {name!r}: expert ids out of range [0, {n_experts})")
    y = naming.to_ours(p.layout, x, leaf.shape)
    if p.expert is None:
        out[p.path] = np.ascontiguousarray(y.astype(dt, copy=False))
        return
    if p.path not in out:
        out[p.path] = np.empty(leaf.shape, dt)
    out[p.path][p.expert] = y
