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
import re
import warnings
from typing import NamedTuple

import flax.traverse_util as tu
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from v4jax.config import V4Config
from v4jax.layers import quantized as qw
from v4jax.model.layout import layer_plan, locate, unstack_variables
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


def load_variables(path, cfg: V4Config | None = None, dtype=None, *, require_mtp: bool = False,
                   weights: str = "dequantized") -> LoadedWeights:
    """Load ``path`` (a checkpoint directory, or one ``.safetensors`` file) for ``cfg`` (default:
    the directory's ``config.json``). Float params are returned as numpy arrays of ``dtype``
    (default ``cfg.param_dtype``); buffers keep the model's dtypes (``bias`` fp32, ``tid2eid``
    int32). Returns ``LoadedWeights(variables, cfg)``; see the module docstring for MTP.

    ``weights="native"``: every FP8 / FP4 matrix stays as stored, a
    ``v4jax.layers.quantized.QuantizedWeight`` (codes and scales in the checkpoint layout, FP4
    packed two per byte) that the model dequantizes inside its compiled program; bf16 / fp32
    tensors load as with ``"dequantized"`` (the default: everything in ``dtype``)."""
    r = load_checkpoint(path, cfg, dtype, require_mtp=require_mtp, weights=weights)
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


# what the loader understands of a config.json's ``quantization_config`` (the released one:
# quant_method fp8, fmt e4m3, scale_fmt ue8m0, weight_block_size [128, 128], activation_scheme dynamic)
_QUANT_KEYS = {"quant_method": ("fp8",), "fmt": ("e4m3", "e5m2"), "scale_fmt": ("ue8m0", None),
               "activation_scheme": ("dynamic", None)}
_EXPERT_DTYPES = ("fp4", "fp8", "bf16", "bfloat16", None)


def _block_hint(directory: str) -> tuple[int, int] | None:
    """The ``weight_block_size`` of ``config.json``'s ``quantization_config`` (None if absent);
    a ``quantization_config`` the loader does not understand is a ``CheckpointError``."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    qc, ed = d.get("quantization_config"), d.get("expert_dtype")
    where = os.path.join(directory, "config.json")
    if ed not in _EXPERT_DTYPES:
        raise CheckpointError(f"{where}: expert_dtype {ed!r} is not one of {_EXPERT_DTYPES[:-1]}")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object, got {qc!r}")
    for key, allowed in _QUANT_KEYS.items():
        if qc.get(key) not in allowed:
            raise CheckpointError(f"{where}: quantization_config.{key} = {qc.get(key)!r} is not supported "
                                  f"(DeepSeek-V4 checkpoints use {allowed[0]!r}); known: {[a for a in allowed if a]}")
    b = qc.get("weight_block_size")
    if b is None:
        return None
    if not (isinstance(b, list) and len(b) == 2 and all(isinstance(v, int) and v > 0 for v in b)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive integers, got {b!r}")
    return int(b[0]), int(b[1])


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


def _scale_block(info: TensorInfo, scale: TensorInfo, block) -> tuple[int, int]:
    """The FP8 tile (rows, cols) of ``info``'s block scale (the config's ``weight_block_size`` if
    it tiles the shapes, else inferred as ``quant.dequant_fp8_block`` does)."""
    pr, pc = block if block is not None else (None, None)
    try:
        return (quant.infer_block(info.shape[0], scale.shape[0], pr), quant.infer_block(info.shape[1], scale.shape[1], pc))
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"tensor {info.name!r} {list(info.shape)}: its scale {scale.name!r} "
                              f"{list(scale.shape)} does not tile it: {e}") from None


def _native_scale(s: np.ndarray, name: str) -> np.ndarray:
    """A stored scale kept as it is (e8m0 bytes or a float dtype), raw ue8m0 exponents as e8m0."""
    if s.dtype == np.uint8:
        return s.view(ml_dtypes.float8_e8m0fnu)
    if s.dtype == np.dtype(ml_dtypes.float8_e8m0fnu) or np.issubdtype(s.dtype, np.floating) or s.dtype in (
            np.dtype(ml_dtypes.bfloat16),):
        return s
    raise CheckpointError(f"scale {name!r}: unsupported dtype {s.dtype}")


def _native(f: SafetensorsFile, info: TensorInfo, scale_file, scale: TensorInfo, block, layout: str) -> _NativeTensor:
    """A quantized tensor as stored: codes (FP8, or FP4 bytes) and its scale, checked to tile."""
    x, s = f.get(info.name), _native_scale(scale_file.get(scale.name), scale.name)
    if info.dtype in _FP8:
        if x.ndim != 2 or s.ndim != 2:
            raise CheckpointError(f"tensor {info.name!r}: FP8 weight and scale must be 2-D, got {list(x.shape)} "
                                  f"and {list(s.shape)}")
        if info.dtype != "F8_E4M3":
            raise CheckpointError(f"tensor {info.name!r}: native weights support FP8 e4m3 (the released format), "
                                  f"not {info.dtype}; load with weights='dequantized'")
        return _NativeTensor(x, s, "fp8", _scale_block(info, scale, block), layout)
    codes = x.reshape(x.shape[:-1] + (-1,)).view(np.uint8)
    n = 2 * codes.shape[-1]
    if s.shape[:-1] != codes.shape[:-1] or s.shape[-1] * qw.FP4_BLOCK != n:
        raise CheckpointError(f"tensor {info.name!r}: FP4 scale {scale.name!r} {list(s.shape)} does not tile "
                              f"{list(codes.shape[:-1]) + [n]} in 1 x {qw.FP4_BLOCK} blocks (the released format)")
    return _NativeTensor(codes, s, "fp4", qw.FP8_BLOCK, layout)


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


class _NativeTensor(NamedTuple):
    codes: np.ndarray
    scale: np.ndarray
    fmt: str
    block: tuple[int, int]
    layout: str


_KEEP = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
_NATIVE_LAYOUTS = {"linear": "t", "expert": "t", "wo_a": "wo_a"}
WEIGHTS = ("dequantized", "native")


def load_checkpoint(path, cfg: V4Config | None = None, dtype=None, *, require_mtp: bool = False,
                    weights: str = "dequantized") -> LoadReport:
    """``load_variables`` with the full report (``mtp_loaded``, ``ignored`` names)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
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
        # native: a bf16 / fp32 tensor also stays as stored (unless ``dtype`` is given), so the
        # resident bytes are the file's
        dest = _Destination(plan.cfg, plan.expected, param_dt, keep_stored=weights == "native" and dtype is None)
        for fn, r in readers.items():
            for name in sorted((n for n in r.tensors if n in plan.sources and infos[n].file == fn),
                               key=lambda n: r.tensors[n].begin):
                sc = plan.scales.get(name)
                pls = plan.sources[name]
                if weights == "native" and sc is not None and pls[0].layout in _NATIVE_LAYOUTS:
                    x = _native(r, infos[name], readers[sc.file], sc, block, _NATIVE_LAYOUTS[pls[0].layout])
                else:
                    x = _materialise(r, infos[name], readers[sc.file] if sc else None, sc, block)
                for p in pls:
                    dest.place(p, x, plan.cfg.n_routed_experts, name)
                del x
        return LoadReport(dest.variables(), plan.cfg, plan.mtp_loaded, plan.ignored)
    finally:
        for r in readers.values():
            r.close()


class _Destination:
    """The variables being filled, allocated once in the model's stacked layout
    (``v4jax.model.layout``): a layer's tensor is written into its slot of the stack, so loading
    never holds a per-layer copy next to the stacked one. Native tensors fill codes and scales
    (``QuantizedWeight``) the same way."""

    def __init__(self, cfg: V4Config, expected: dict, param_dt: np.dtype, keep_stored: bool = False):
        self.cfg, self.expected, self.param_dt, self.keep_stored = cfg, expected, param_dt, keep_stored
        self.plan = layer_plan(cfg)
        self.arrays: dict[str, object] = {}

    def _where(self, path: str) -> tuple[str, int | None, int]:
        """Canonical ``col/layers_i/rest`` -> (stacked path, repeat index or None, repeats)."""
        col, top, *rest = path.split("/")
        m = re.fullmatch(r"layers_(\d+)", top)
        if m is None:
            return path, None, 1
        k, r, j = locate(self.cfg, int(m.group(1)))
        return "/".join([col, f"stack_{k}", f"layer_{j}", *rest]), r, self.plan[k].repeats

    def place(self, p: naming.Placement, x, n_experts: int, name: str) -> None:
        leaf = self.expected[p.path]
        spath, r, reps = self._where(p.path)
        lead = () if r is None else (reps,)
        slot = (() if r is None else (r,)) + (() if p.expert is None else (p.expert,))
        if isinstance(x, _NativeTensor):
            self._place_native(spath, lead, slot, p, x, leaf, name)
            return
        dt = self.param_dt if p.path.startswith("params/") else np.dtype(leaf.dtype)
        if self.keep_stored and p.path.startswith("params/") and x.dtype in _KEEP:
            dt = x.dtype
        if p.layout == "int" and x.size and (x.min() < 0 or x.max() >= n_experts):
            raise CheckpointError(f"tensor {name!r}: expert ids out of range [0, {n_experts})")
        y = naming.to_ours(p.layout, x, leaf.shape)
        if not slot:
            self.arrays[spath] = np.ascontiguousarray(y.astype(dt, copy=False))
            return
        if spath not in self.arrays:
            self.arrays[spath] = np.empty(lead + tuple(leaf.shape), dt)
        self.arrays[spath][slot] = y

    def _place_native(self, spath, lead, slot, p, x: _NativeTensor, leaf, name: str) -> None:
        e_lead = (leaf.shape[0],) if p.expert is not None else ()
        groups = leaf.shape[-3] if x.layout == "wo_a" else 1
        got = qw.ours_shape(x.codes.shape[:-1] + ((2 if x.fmt == "fp4" else 1) * x.codes.shape[-1],), x.layout, groups)
        want = tuple(leaf.shape[1:]) if p.expert is not None else tuple(leaf.shape)
        if got != want:
            raise CheckpointError(f"tensor {name!r}: native {x.fmt} weight gives {list(got)}, {p.path} needs {list(want)}")
        if spath not in self.arrays:
            self.arrays[spath] = _NativeSlots(np.empty(lead + e_lead + x.codes.shape, x.codes.dtype),
                                              np.empty(lead + e_lead + x.scale.shape, x.scale.dtype),
                                              x.fmt, x.layout, groups, x.block)
        d = self.arrays[spath]
        if (d.fmt, d.block, d.codes.shape[len(slot):], d.scale.shape[len(slot):], d.scale.dtype) != (
                x.fmt, x.block, x.codes.shape, x.scale.shape, x.scale.dtype):
            raise CheckpointError(f"tensor {name!r}: its format ({x.fmt}, block {x.block}, scale {list(x.scale.shape)} "
                                  f"{x.scale.dtype}) differs from the other tensors stacked into {p.path}")
        if slot:
            d.codes[slot], d.scale[slot] = x.codes, x.scale
        else:
            self.arrays[spath] = d._replace(codes=np.ascontiguousarray(x.codes), scale=np.ascontiguousarray(x.scale))

    def variables(self) -> dict:
        flat = {}
        for k, v in self.arrays.items():
            flat[tuple(k.split("/"))] = (qw.QuantizedWeight(v.codes, v.scale, v.fmt, v.layout, v.groups, v.block)
                                         if isinstance(v, _NativeSlots) else v)
        return tu.unflatten_dict(flat)


class _NativeSlots(NamedTuple):
    codes: np.ndarray
    scale: np.ndarray
    fmt: str
    layout: str
    groups: int
    block: tuple[int, int]
