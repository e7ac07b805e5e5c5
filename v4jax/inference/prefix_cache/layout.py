"""The cache pytree read generically (``cache_layout``: which axis of each leaf is the batch axis
and which grows with ``max_len``, and by which ratio, from ``jax.eval_shape`` of ``init_cache`` at
two batch sizes and two lengths) and the bytes an entry takes on disk. See
``v4jax.inference.prefix_cache`` for the design."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import V4Config
from v4jax.model.transformer import init_cache

FORMAT_VERSION = 1
MIN_ALIGN = 64

_FP4 = np.dtype(jnp.float4_e2m1fn)


# ---------------------------------------------------------------------------------------------
# the cache pytree, read generically
# ---------------------------------------------------------------------------------------------

def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


@dataclass(frozen=True)
class LeafSpec:
    """One cache leaf: ``shape`` at batch 1 and the layout's probe length; ``batch_axis`` (None:
    shared by all rows, e.g. ``max_len``); ``len_axis`` and ``ratio`` when the leaf has
    ``max_len // ratio`` rows along ``len_axis`` (compressed entries, indexer keys)."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    batch_axis: int | None
    len_axis: int | None
    ratio: int | None

    def shape_for(self, batch: int, max_len: int) -> tuple[int, ...]:
        s = list(self.shape)
        if self.batch_axis is not None:
            s[self.batch_axis] = batch
        if self.len_axis is not None:
            s[self.len_axis] = max_len // self.ratio
        return tuple(s)

    def row_shape(self, length: int) -> tuple[int, ...]:
        """One sequence's stored shape after ``length`` tokens (batch axis removed, entry rows cut)."""
        s = list(self.shape_for(1, length))
        if self.batch_axis is not None:
            del s[self.batch_axis]
        return tuple(s)

    def row_len_axis(self) -> int | None:
        if self.len_axis is None:
            return None
        return self.len_axis - (self.batch_axis is not None and self.batch_axis < self.len_axis)


@dataclass(frozen=True)
class CacheLayout:
    """Where the batch and length axes of every leaf of ``init_cache(cfg, B, M, dtype, fmt)`` are
    (in tree order), the compression ratios found, and a fingerprint of the per-row structure."""

    fmt: str
    dtype: str
    leaves: tuple[LeafSpec, ...]
    fingerprint: str

    @property
    def ratios(self) -> tuple[int, ...]:
        return tuple(sorted({l.ratio for l in self.leaves if l.ratio}))

    @property
    def row_leaves(self) -> tuple[LeafSpec, ...]:
        """The per-sequence leaves (what an entry stores)."""
        return tuple(l for l in self.leaves if l.batch_axis is not None)

    def default_align(self) -> int:
        return math.lcm(MIN_ALIGN, *self.ratios)

    def matches(self, cache) -> bool:
        flat = jax.tree_util.tree_flatten_with_path(cache)[0]
        if len(flat) != len(self.leaves):
            return False
        pos = self.by_path().get("pos")
        B = int(np.shape(cache["pos"])[0]) if pos is not None else 1
        M = int(cache["max_len"]) if "max_len" in cache else 0
        for (p, leaf), spec in zip(flat, self.leaves):
            if (_path_str(p) != spec.path or np.dtype(leaf.dtype).name != spec.dtype
                    or tuple(leaf.shape) != spec.shape_for(B, M)):
                return False
        return True

    def by_path(self) -> dict[str, LeafSpec]:
        return {l.path: l for l in self.leaves}


def _diff_axis(a: tuple, b: tuple, what: str, path: str) -> int | None:
    if len(a) != len(b):
        raise NotImplementedError(f"prefix cache: leaf {path} changes rank with the {what}")
    axes = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(axes) > 1:
        raise NotImplementedError(f"prefix cache: leaf {path} has several {what} axes {axes}")
    return axes[0] if axes else None


@lru_cache(maxsize=64)
def _layout(cfg: V4Config, fmt: str, dtype: str) -> CacheLayout:
    ratios = [r for r in cfg.compress_ratios if r] or [1]
    m1 = math.lcm(*ratios)
    m2 = 2 * m1
    if m2 > cfg.max_seq_len:
        raise NotImplementedError(f"prefix cache: max_seq_len {cfg.max_seq_len} is below twice the "
                                  f"compression ratios' lcm {m1}")
    shapes = lambda b, m: jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(lambda: init_cache(cfg, b, m, jnp.dtype(dtype), fmt)))[0]
    base, wide, long = shapes(1, m1), shapes(2, m1), shapes(1, m2)
    specs = []
    for (p, a), (_, b), (_, c) in zip(base, wide, long):
        path = _path_str(p)
        ba = _diff_axis(a.shape, b.shape, "batch", path)
        if ba is not None and (a.shape[ba], b.shape[ba]) != (1, 2):
            raise NotImplementedError(f"prefix cache: leaf {path}'s batch axis is not of size batch")
        la = _diff_axis(a.shape, c.shape, "length", path)
        ratio = None
        if la is not None:
            n1, n2 = a.shape[la], c.shape[la]
            ratio = (m2 - m1) // (n2 - n1) if n2 > n1 else 0
            if ratio < 1 or (m2 - m1) % (n2 - n1) or n1 != m1 // ratio or n2 != m2 // ratio:
                raise NotImplementedError(f"prefix cache: leaf {path} does not have max_len // ratio rows")
            if ba is None:
                raise NotImplementedError(f"prefix cache: leaf {path} grows with max_len but has no batch axis")
        specs.append(LeafSpec(path, np.dtype(a.dtype).name, tuple(a.shape), ba, la, ratio))
    row = [(l.path, l.dtype, list(l.row_shape(0)), l.row_len_axis(), l.ratio)
           for l in specs if l.batch_axis is not None]
    fp = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, "fmt": fmt, "row": row}, sort_keys=True).encode()).hexdigest()
    return CacheLayout(fmt, dtype, tuple(specs), fp)


def cache_layout(cfg: V4Config, fmt: str = "native", dtype=None) -> CacheLayout:
    """The layout of ``init_cache(cfg, ., ., dtype, fmt)`` (default dtype: ``cfg.dtype``, what
    ``V4Model.new_cache`` uses); memoised, computed with ``jax.eval_shape`` (allocates nothing)."""
    if fmt not in ("native", "fp8"):
        raise ValueError(f"cache format must be 'native' or 'fp8', got {fmt!r}")
    return _layout(cfg, fmt, jnp.dtype(dtype or cfg.dtype).name)


def _cfg_of(model_or_cfg) -> V4Config:
    return model_or_cfg if isinstance(model_or_cfg, V4Config) else model_or_cfg.cfg


def layout_of(model_or_cfg, cache, fmt: str | None = None, dtype=None) -> CacheLayout:
    """The layout that a concrete ``cache`` (any batch, any max_len) was built with; ``fmt`` and
    ``dtype`` are inferred by matching when not given."""
    cfg = _cfg_of(model_or_cfg)
    fmts = (fmt,) if fmt else ("native", "fp8")
    dtypes = (dtype,) if dtype else tuple(dict.fromkeys([cfg.dtype, "float32", "bfloat16", "float16"]))
    for f in fmts:
        for d in dtypes:
            lay = cache_layout(cfg, f, d)
            if lay.matches(cache):
                return lay
    raise ValueError(f"this cache does not have the structure of init_cache({cfg.name!r}, fmt in {fmts}, "
                     f"dtype in {dtypes}); pass fmt= and dtype=")


# ---------------------------------------------------------------------------------------------
# bytes on disk
# ---------------------------------------------------------------------------------------------

def _packable(a: np.ndarray) -> bool:
    return a.dtype == _FP4 and a.size % 2 == 0 and not (_u8(a) & 0xF0).any()


def _disk_nbytes(a: np.ndarray) -> int:
    return a.nbytes // 2 if _packable(a) else a.nbytes


def _spec_disk_bytes(spec: LeafSpec, length: int) -> float:
    n = int(np.prod(spec.row_shape(length), dtype=np.int64)) * np.dtype(spec.dtype).itemsize
    return n / 2 if np.dtype(spec.dtype) == _FP4 else n


def entry_payload_bytes(cfg: V4Config, length: int, fmt: str = "native", dtype=None) -> int:
    """Payload bytes of one entry for a ``length``-token prefix (the header adds a few KB)."""
    return int(sum(_spec_disk_bytes(s, length) for s in cache_layout(cfg, fmt, dtype).row_leaves))


def bytes_per_token(cfg: V4Config, fmt: str = "native", dtype=None, length: int | None = None) -> float:
    """On-disk bytes per prefix token. ``length=None``: the growth rate (the compressed entries'
    and indexer keys' rows, ``sum(row bytes / ratio)``); with ``length``: the whole payload,
    including the fixed per-sequence state (window rings, compressor rings, position), divided by
    ``length``. Computed from the cache pytree's shapes (``jax.eval_shape``: nothing allocated)."""
    lay = cache_layout(cfg, fmt, dtype)
    if length is None:
        return float(sum(_spec_disk_bytes(s, s.ratio) / s.ratio for s in lay.row_leaves if s.ratio))
    return entry_payload_bytes(cfg, length, fmt, dtype) / length


def fixed_state_bytes(cfg: V4Config, fmt: str = "native", dtype=None) -> int:
    """The part of every entry that does not grow with the prefix (windows, compressor rings, pos)."""
    return entry_payload_bytes(cfg, 0, fmt, dtype)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


@dataclass
class RowState:
    """One sequence's cache state after ``length`` tokens: ``leaves`` maps each per-row leaf's path
    to a host array (batch axis removed; entries cut to ``length // ratio`` rows), in tree order;
    ``specs`` says where its batch and length axes go back."""

    length: int
    fmt: str
    layout: str                         # CacheLayout.fingerprint
    leaves: dict[str, np.ndarray]
    specs: dict[str, LeafSpec]

    @property
    def nbytes(self) -> int:
        """Bytes of the payload on disk (FP4 packed two per byte)."""
        return sum(_disk_nbytes(a) for a in self.leaves.values())
