"""On-disk prefix KV cache (issue #14): requests that share a long prompt pay its prefill once.

An entry is the cache state of ONE sequence after prefilling exactly ``L`` tokens, where ``L`` is a
multiple of the alignment ``align`` (a multiple of every compression ratio: no compressor holds a
half-filled block there, and every complete entry row is final). It holds every per-sequence leaf
of the real cache pytree (``v4jax.model.transformer.init_cache``): the position, the window rings,
the compressors' projection rings, and the compressed CSA/HCA entries and indexer keys, the
latter cut to the ``L // ratio`` rows that exist, so an entry's size grows with ``L``, not with
the cache's ``max_len``. Every leaf keeps its dtype bit-exactly (fp32, bf16, fp8 e4m3, e8m0
scales, fp4 e2m1 packed two per byte on disk, int32). Restoring it into a fresh cache row gives
that row exactly the state a prefill of those ``L`` tokens would have left.

The cache pytree is read generically: which axis of a leaf is the batch axis and which grows with
``max_len`` (and by which ratio) is found by comparing ``jax.eval_shape`` of ``init_cache`` at two
batch sizes and two lengths (``cache_layout``), so a change of the compressor's state layout needs
no change here (the layout's fingerprint is part of every key: old entries simply stop matching).

Keys (sha256, also the file name): the model (``model_fingerprint``: canonical JSON of the config
and a hash of every parameter / buffer leaf's bytes, dtype and shape, in tree order), the cache
format (``"native"`` / ``"fp8"``), the cache layout (paths, dtypes and per-row shapes of the
leaves: this covers the cache dtype), the prefix length and the sha256 of its token ids (int32).

File format (``<key>.v4pc``)::

    b"V4PCACHE" | u32 version | u32 header_len | sha256(header) [32 bytes] | header | payload

``header``: UTF-8 JSON ``{"version", "key", "model", "fmt", "layout", "length", "tokens",
"dtype", "payload_bytes", "payload_sha256", "leaves": [{"path", "dtype", "shape", "offset",
"nbytes", "packing", "batch_axis", "len_axis", "ratio"}, ...]}``; ``payload``: each leaf's C-order
bytes (batch axis removed, entries axis cut), concatenated in tree order; ``packing = "fp4x2"``
marks FP4 leaves stored two values per byte. Both checksums are verified on every read; an entry
that fails (corrupt, truncated, unreadable, other layout) is warned about (``warnings.warn``
naming the file), deleted and treated as a miss: it is never used.

Writes are atomic (temp file in the same directory, ``fsync``, ``os.replace``, directory fsync);
recency is the file's mtime (set on store and on every hit, strictly increasing within a
process), so several processes can share a directory: after each store the least recently used
entries are deleted until the total is at most ``max_bytes``; files that vanish between listing
and reading (another process evicted them) are misses, not errors.

Typical use (``prefill_with_cache`` does all of this for a batch)::

    cache = PrefixCache("/var/cache/v4", max_bytes=50 * 2**30)
    L, state = cache.lookup(model, ids_row, fmt="native")
    kv = model.new_cache(batch, max_len)
    if state is not None:
        kv = restore_into(kv, row, state)           # then extend ids_row[L:] from position L
    ...
    cache.store(model, ids_row, take_row(model, kv, row))   # the row must be at an aligned position

Size: an entry is ``fixed_state_bytes`` (window rings, the compressors' fp32 projection rings,
pos: 15-22 MB for Flash / Pro in fp8, about 4k tokens' worth of entries) plus ``bytes_per_token``
per prefix token (3.5 KB Flash fp8, 5.0 KB Pro fp8: the spec 3.8 figures). At an aligned boundary
the HCA rings are never read again (their block is complete), but they are stored anyway so that
a restored row is bit-identical to a prefilled one.

Cost of the model fingerprint: it reads every weight once (sha256, about 1-2 GB/s per core; leaves
are hashed on a thread pool and big leaves slice by slice, so host memory stays bounded), then is
memoised per model object. That is milliseconds for the test models, about 20 s for ``tiny``-sized
checkpoints of a few GB, but minutes for Flash (~150 GB of FP8/FP4 weights) or Pro (~800 GB); for
those set it once from something cheaper that identifies the weights (e.g. a checkpoint's own
content hash) with ``set_model_fingerprint(model, "...")``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import V4Config
from v4jax.model.transformer import init_cache

FORMAT_VERSION = 1
MAGIC = b"V4PCACHE"
SUFFIX = ".v4pc"
_TMP_PREFIX = ".tmp-"
_PREAMBLE = struct.Struct("<8sII32s")      # magic, version, header length, header sha256
MIN_ALIGN = 64
_FP4 = np.dtype(jnp.float4_e2m1fn)
_TMP_MAX_AGE_S = 3600.0                    # stale temp files (a crashed writer) are removed after this


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
# one sequence's state: take it out of a batched cache, put it into one
# ---------------------------------------------------------------------------------------------

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


def _take(leaves, row, spec):
    out = []
    for leaf, (ba, la, n) in zip(leaves, spec):
        x = jax.lax.dynamic_index_in_dim(leaf, row, ba, keepdims=False)
        if la is not None:
            x = jax.lax.slice_in_dim(x, 0, n, axis=la)
        out.append(x)
    return out


_take_jit = jax.jit(_take, static_argnums=(2,))


def take_row(model_or_cfg, cache: dict, row: int, length: int | None = None, fmt: str | None = None,
             dtype=None) -> RowState:
    """Row ``row`` of a batched ``cache`` as a ``RowState`` on the host. The row must hold exactly
    ``length`` tokens (default: its position ``cache["pos"][row]``)."""
    lay = layout_of(model_or_cfg, cache, fmt, dtype)
    pos = int(np.asarray(cache["pos"])[row])
    length = pos if length is None else int(length)
    if length != pos:
        raise ValueError(f"cache row {row} is at position {pos}, not {length}: a prefix entry must be "
                         f"taken right after prefilling exactly its length")
    flat = jax.tree_util.tree_flatten_with_path(cache)[0]
    specs = lay.leaves
    sel = [(leaf, s) for (_, leaf), s in zip(flat, specs) if s.batch_axis is not None]
    static = tuple((s.batch_axis, s.row_len_axis(), (length // s.ratio) if s.ratio else None) for _, s in sel)
    got = jax.device_get(_take_jit([l for l, _ in sel], jnp.int32(row), static))
    leaves = {s.path: np.asarray(a) for (_, s), a in zip(sel, got)}
    return RowState(length, lay.fmt, lay.fingerprint, leaves, {s.path: s for _, s in sel})


def _insert(leaves, row, updates, axes):
    out = []
    for leaf, upd, ba in zip(leaves, updates, axes):
        if upd is None:
            out.append(leaf)
            continue
        upd = jnp.expand_dims(upd, ba)
        starts = [jnp.int32(0)] * leaf.ndim
        starts[ba] = row
        out.append(jax.lax.dynamic_update_slice(leaf, upd, starts))
    return out


_insert_jit = jax.jit(_insert, static_argnums=(3,))
_insert_donating = jax.jit(_insert, static_argnums=(3,), donate_argnums=(0,))


def restore_into(cache: dict, row: int, state: RowState, donate: bool = False) -> dict:
    """``cache`` (any batch, ``max_len >= state.length``, freshly made or with ``row`` free) with
    row ``row`` set to ``state``: every per-row leaf is written with one ``dynamic_update_slice``
    (entries: rows ``[0, length // ratio)``, the rest of the row keeps the fresh cache's values,
    which are what a prefill of ``length`` tokens leaves there). One jitted call; it compiles once
    per (cache shape, prefix length). ``donate=True`` consumes ``cache`` (updated in place)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(cache)
    paths = [_path_str(p) for p, _ in flat]
    missing = set(state.leaves) - set(paths)
    if missing:
        raise ValueError(f"restore_into: the cache has no leaf {sorted(missing)[0]!r} (another cache layout)")
    B = int(np.shape(cache["pos"])[0])
    if not 0 <= row < B:
        raise ValueError(f"restore_into: row {row} is outside the cache's batch {B}")
    updates, axes = [], []
    for path, (_, leaf) in zip(paths, flat):
        arr, spec = state.leaves.get(path), state.specs.get(path)
        if arr is None:
            updates.append(None)
            axes.append(None)
            continue
        want = list(leaf.shape)
        del want[spec.batch_axis]
        la = spec.row_len_axis()
        if np.dtype(leaf.dtype) != arr.dtype or len(want) != arr.ndim or any(
                (w < a if i == la else w != a) for i, (w, a) in enumerate(zip(want, arr.shape))):
            raise ValueError(f"restore_into: leaf {path!r} is {arr.dtype}{list(arr.shape)} in the entry but "
                             f"{np.dtype(leaf.dtype)}{want} per row in the cache (another layout, or a "
                             f"max_len below the prefix length {state.length})")
        updates.append(arr)
        axes.append(spec.batch_axis)
    fn = _insert_donating if donate else _insert_jit
    new = fn([leaf for _, leaf in flat], jnp.int32(row), updates, tuple(axes))
    return jax.tree_util.tree_unflatten(treedef, new)


# ---------------------------------------------------------------------------------------------
# model fingerprint
# ---------------------------------------------------------------------------------------------

_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FP_LOCK = threading.Lock()
_SLICE_BYTES = 256 << 20


def config_fingerprint(cfg: V4Config) -> str:
    """sha256 of the config's canonical JSON (every field, sorted keys)."""
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _leaf_digest(leaf) -> bytes:
    """sha256 of a leaf's C-order bytes; leaves over 256 MB are read slice by slice along axis 0
    (the same digest, bounded host memory)."""
    h = hashlib.sha256()
    nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    if leaf.ndim and nbytes > _SLICE_BYTES and leaf.shape[0] > 1:
        step = max(1, _SLICE_BYTES * leaf.shape[0] // nbytes)
        for i in range(0, leaf.shape[0], step):
            h.update(_u8(np.asarray(jax.device_get(leaf[i:i + step]))))
    else:
        h.update(_u8(np.asarray(jax.device_get(leaf))))
    return h.digest()


def weights_fingerprint(variables) -> str:
    """sha256 over every leaf (path, dtype, shape, sha256 of its bytes) in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda pl: _leaf_digest(pl[1]), flat))
    h = hashlib.sha256()
    for (p, leaf), d in zip(flat, digests):
        h.update(json.dumps([_path_str(p), np.dtype(leaf.dtype).name, list(leaf.shape)]).encode())
        h.update(d)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 of (config JSON, weights); computed once per model object (see the module doc for
    the cost on big models and ``set_model_fingerprint``)."""
    with _FP_LOCK:
        fp = _FINGERPRINTS.get(model)
    if fp is None:
        blob = json.dumps({"v": FORMAT_VERSION, "config": config_fingerprint(model.cfg),
                           "weights": weights_fingerprint(model.variables)})
        fp = hashlib.sha256(blob.encode()).hexdigest()
        with _FP_LOCK:
            _FINGERPRINTS[model] = fp
    return fp


def set_model_fingerprint(model, weights_id: str) -> None:
    """Identify ``model``'s weights by ``weights_id`` (e.g. a checkpoint's own content hash) instead
    of hashing them; the config is still hashed. Two models given the same id share entries."""
    blob = json.dumps({"v": FORMAT_VERSION, "config": config_fingerprint(model.cfg), "weights_id": str(weights_id)})
    with _FP_LOCK:
        _FINGERPRINTS[model] = hashlib.sha256(blob.encode()).hexdigest()


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


# ---------------------------------------------------------------------------------------------
# the on-disk cache
# ---------------------------------------------------------------------------------------------

class CorruptEntry(Exception):
    pass


def _tokens(ids_row) -> np.ndarray:
    a = np.asarray(ids_row)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"ids_row must be a 1-D integer array (one sequence), got {a.dtype}{list(a.shape)}")
    return np.ascontiguousarray(a.astype("<i4"))


def _prefix_digests(tokens: np.ndarray, lengths) -> dict[int, str]:
    """sha256 of ``tokens[:L]`` (int32 little-endian) for every L in ``lengths``, in one pass."""
    out, h, at = {}, hashlib.sha256(), 0
    for L in sorted(lengths):
        h.update(tokens[at:L].tobytes())
        at = L
        out[L] = h.copy().hexdigest()
    return out


class PrefixCache:
    """A directory of prefix entries, at most ``max_bytes`` in total (LRU eviction after each store).

    ``align``: prefix lengths are multiples of it (default: ``lcm(64, every compression ratio)``;
    given explicitly it must be a multiple of every ratio of the models it serves).
    ``lookup`` -> ``(L, RowState)`` or ``(0, None)``; ``store``; ``stats``; ``clear()``.
    Safe to share between processes (atomic writes, every read verified)."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 16 << 30, align: int | None = None):
        if not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        if align is not None and (not isinstance(align, (int, np.integer)) or align < 1):
            raise ValueError(f"align must be None or an integer >= 1, got {align!r}")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._align = None if align is None else int(align)
        self._clock = 0
        self._lock = threading.Lock()
        self.counters = {"hits": 0, "misses": 0, "stores": 0, "evictions": 0, "corrupt": 0}

    # -- keys ---------------------------------------------------------------------------------
    def align_for(self, layout: CacheLayout) -> int:
        if self._align is None:
            return layout.default_align()
        bad = [r for r in layout.ratios if self._align % r]
        if bad:
            raise ValueError(f"PrefixCache align {self._align} is not a multiple of the compression ratio(s) {bad}")
        return self._align

    @staticmethod
    def key(model_fp: str, fmt: str, layout_fp: str, length: int, tokens_sha: str) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, "model": model_fp, "fmt": fmt, "layout": layout_fp,
                           "length": int(length), "tokens": tokens_sha}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key + SUFFIX)

    # -- lookup -------------------------------------------------------------------------------
    def lookup(self, model, ids_row, fmt: str = "native", dtype=None, max_len: int | None = None):
        """The longest stored aligned prefix of ``ids_row`` (1-D token ids of one sequence) for this
        model, cache format and dtype: ``(L, RowState)`` with ``align <= L < len(ids_row)`` (at
        least one token is left to run, which gives the next logits) and ``L <= max_len``, or
        ``(0, None)``. A hit refreshes the entry's recency."""
        tokens = _tokens(ids_row)
        lay = cache_layout(model.cfg, fmt, dtype)
        align = self.align_for(lay)
        top = len(tokens) - 1 if max_len is None else min(len(tokens) - 1, int(max_len))
        cands = list(range(align, top + 1, align))
        if cands:
            names = self._entry_names()
            fp = model_fingerprint(model)
            digests = _prefix_digests(tokens, cands)
            for L in reversed(cands):
                key = self.key(fp, lay.fmt, lay.fingerprint, L, digests[L])
                if key + SUFFIX not in names:
                    continue
                state = self._load(self.path(key), key, lay)
                if state is not None:
                    self._touch(self.path(key))
                    with self._lock:
                        self.counters["hits"] += 1
                    return L, state
        with self._lock:
            self.counters["misses"] += 1
        return 0, None

    def _entry_names(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.directory) if n.endswith(SUFFIX)}
        except FileNotFoundError:
            return set()

    def _load(self, path: str, key: str, lay: CacheLayout) -> RowState | None:
        try:
            with open(path, "rb") as f:
                state = _read_entry(f, key, lay)
        except FileNotFoundError:
            return None                     # evicted by another process meanwhile: a plain miss
        except (CorruptEntry, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                struct.error) as e:
            warnings.warn(f"prefix cache: ignoring unreadable entry {path}: {e}; it is deleted", RuntimeWarning,
                          stacklevel=3)
            with self._lock:
                self.counters["corrupt"] += 1
            _remove(path)
            return None
        return state

    # -- store --------------------------------------------------------------------------------
    def store(self, model, ids_row, state, length: int | None = None, row: int | None = None) -> str | None:
        """Store one sequence's state as the entry for ``ids_row[:length]``. ``state``: a
        ``RowState`` (``take_row``) or a batched cache with ``row=``; its length must equal
        ``length`` (default: the state's) and be a positive multiple of the alignment. Returns the
        entry's path (None when the entry alone exceeds ``max_bytes``); an existing entry is only
        refreshed (entries are content-addressed). Evicts LRU entries down to ``max_bytes``."""
        if isinstance(state, dict):
            if row is None:
                raise ValueError("store: give row= with a batched cache")
            state = take_row(model, state, row, length)
        length = state.length if length is None else int(length)
        tokens = _tokens(ids_row)
        lay = cache_layout(model.cfg, state.fmt, None)
        if lay.fingerprint != state.layout:
            lay = next((cache_layout(model.cfg, state.fmt, d) for d in ("float32", "bfloat16", "float16")
                        if cache_layout(model.cfg, state.fmt, d).fingerprint == state.layout), None)
            if lay is None:
                raise ValueError("store: the state's cache layout is not one of this model's")
        align = self.align_for(lay)
        if length != state.length:
            raise ValueError(f"store: the state holds {state.length} tokens, not {length}")
        if length < 1 or length % align or length > len(tokens):
            raise ValueError(f"store: prefix length {length} must be a positive multiple of {align} and at "
                             f"most the {len(tokens)} ids given")
        key = self.key(model_fingerprint(model), state.fmt, state.layout, length,
                       _prefix_digests(tokens, [length])[length])
        path = self.path(key)
        if os.path.exists(path):
            self._touch(path)
            return path
        header = {"version": FORMAT_VERSION, "key": key, "model": model_fingerprint(model), "fmt": state.fmt,
                  "layout": state.layout, "length": length, "tokens": _prefix_digests(tokens, [length])[length],
                  "dtype": lay.dtype, "config": model.cfg.name}
        _write_entry(self.directory, path, header, state)
        self._touch(path)
        with self._lock:
            self.counters["stores"] += 1
        self.evict()
        return path if os.path.exists(path) else None

    # -- recency and eviction ------------------------------------------------------------------
    def _touch(self, path: str) -> None:
        with self._lock:
            self._clock = max(time.time_ns(), self._clock + 1)
            t = self._clock
        try:
            os.utime(path, ns=(t, t))
        except OSError:
            pass

    def _scan(self) -> list[tuple[int, str, int]]:
        """(mtime_ns, name, size) of every entry; removes stale temp files."""
        out = []
        try:
            it = list(os.scandir(self.directory))
        except FileNotFoundError:
            return out
        now = time.time()
        for e in it:
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            if e.name.endswith(SUFFIX):
                out.append((st.st_mtime_ns, e.name, st.st_size))
            elif e.name.startswith(_TMP_PREFIX) and now - st.st_mtime > _TMP_MAX_AGE_S:
                _remove(e.path)
        return out

    def evict(self) -> int:
        """Delete least recently used entries until the total is at most ``max_bytes``; returns how
        many were deleted (by this call)."""
        entries = sorted(self._scan())
        total = sum(s for _, _, s in entries)
        n = 0
        for _, name, size in entries:
            if total <= self.max_bytes:
                break
            if _remove(os.path.join(self.directory, name)):
                n += 1
            total -= size                   # gone either way (another process may have taken it)
        with self._lock:
            self.counters["evictions"] += n
        return n

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """This object's ``hits``, ``misses``, ``stores``, ``evictions``, ``corrupt`` counts, and the
        directory's current ``bytes`` and ``entries`` (all processes)."""
        entries = self._scan()
        with self._lock:
            c = dict(self.counters)
        return {**c, "bytes": sum(s for _, _, s in entries), "entries": len(entries)}

    def clear(self) -> None:
        """Delete every entry (and temp file) in the directory; the counters are kept."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for n in names:
            if n.endswith(SUFFIX) or n.startswith(_TMP_PREFIX):
                _remove(os.path.join(self.directory, n))

    def __repr__(self) -> str:
        return f"PrefixCache({self.directory!r}, max_bytes={self.max_bytes})"


def _remove(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# file format
# ---------------------------------------------------------------------------------------------

def _pieces(state: RowState):
    """(leaf records, byte buffers) in tree order."""
    recs, bufs, off = [], [], 0
    for path, a in state.leaves.items():
        spec = state.specs[path]
        u8 = _u8(a)
        packing = None
        if _packable(a):
            u8 = (u8[0::2] | (u8[1::2] << 4)).astype(np.uint8)
            packing = "fp4x2"
        recs.append({"path": path, "dtype": a.dtype.name, "shape": list(a.shape), "offset": off,
                     "nbytes": int(u8.nbytes), "packing": packing, "batch_axis": spec.batch_axis,
                     "len_axis": spec.len_axis, "ratio": spec.ratio})
        bufs.append(u8)
        off += u8.nbytes
    return recs, bufs, off


def _write_entry(directory: str, path: str, header: dict, state: RowState) -> None:
    recs, bufs, total = _pieces(state)
    h = hashlib.sha256()
    for b in bufs:
        h.update(b)
    header = {**header, "leaves": recs, "payload_bytes": total, "payload_sha256": h.hexdigest()}
    hb = json.dumps(header, sort_keys=True).encode()
    pre = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(hb), hashlib.sha256(hb).digest())
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pre)
            f.write(hb)
            for b in bufs:
                f.write(memoryview(b))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    try:                                    # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _read_exact(f, n: int) -> bytearray:
    buf = bytearray(n)
    got = f.readinto(buf)
    if got != n:
        raise CorruptEntry(f"truncated ({got} of {n} bytes)")
    return buf


def _read_entry(f, key: str, lay: CacheLayout) -> RowState:
    pre = _read_exact(f, _PREAMBLE.size)
    magic, version, hlen, hsha = _PREAMBLE.unpack(bytes(pre))
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptEntry("not a v4jax prefix-cache entry of this version")
    if hlen > 64 << 20:
        raise CorruptEntry(f"header length {hlen} is implausible")
    hb = bytes(_read_exact(f, hlen))
    if hashlib.sha256(hb).digest() != hsha:
        raise CorruptEntry("header checksum mismatch")
    header = json.loads(hb)
    if header["key"] != key or header["layout"] != lay.fingerprint or header["fmt"] != lay.fmt:
        raise CorruptEntry("the header does not match the file's key")
    payload = _read_exact(f, int(header["payload_bytes"]))
    if f.read(1):
        raise CorruptEntry("trailing bytes after the payload")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CorruptEntry("payload checksum mismatch")
    length = int(header["length"])
    specs = {s.path: s for s in lay.row_leaves}
    if [r["path"] for r in header["leaves"]] != list(specs):
        raise CorruptEntry("its leaves are not this cache layout's")
    leaves = {}
    mv = memoryview(payload)
    for r in header["leaves"]:
        spec = specs[r["path"]]
        dt, shape = jnp.dtype(r["dtype"]), tuple(r["shape"])
        if dt.name != spec.dtype or shape != spec.row_shape(length):
            raise CorruptEntry(f"leaf {r['path']} is {dt.name}{list(shape)}, expected "
                               f"{spec.dtype}{list(spec.row_shape(length))}")
        raw = np.frombuffer(mv[r["offset"]: r["offset"] + r["nbytes"]], np.uint8)
        count = int(np.prod(shape, dtype=np.int64))
        if r["packing"] == "fp4x2":
            if raw.size * 2 != count:
                raise CorruptEntry(f"leaf {r['path']}: {raw.size} packed bytes for {count} values")
            u8 = np.empty(count, np.uint8)
            u8[0::2], u8[1::2] = raw & 0x0F, raw >> 4
            raw = u8
        elif r["packing"] is not None:
            raise CorruptEntry(f"unknown packing {r['packing']!r}")
        if raw.size != count * dt.itemsize:
            raise CorruptEntry(f"leaf {r['path']}: {raw.size} bytes for {count} values of {dt.name}")
        leaves[r["path"]] = raw.view(dt).reshape(shape)
    return RowState(length, lay.fmt, lay.fingerprint, leaves, specs)


# ---------------------------------------------------------------------------------------------
# batched prefill through the cache
# ---------------------------------------------------------------------------------------------

def checkpoint_lengths(prompt_len: int, hit: int, align: int, policy: str = "geometric") -> list[int]:
    """Aligned prefix lengths of a ``prompt_len``-token prompt to store after a hit of ``hit``
    tokens: ``"longest"``: the longest aligned length below ``prompt_len`` (what a request with
    the same prompt, or one extending it, can use); ``"geometric"``: also ``align * 2**j`` (a
    request sharing only the first S tokens still finds an entry longer than S / 2; the disk cost
    is at most about twice the longest's); ``"none"``: nothing."""
    if policy not in ("geometric", "longest", "none"):
        raise ValueError(f"store policy must be 'geometric', 'longest' or 'none', got {policy!r}")
    if policy == "none" or prompt_len < 2:
        return []
    out = {(prompt_len - 1) // align * align}
    if policy == "geometric":
        p = align
        while p < prompt_len:
            out.add(p)
            p *= 2
    return sorted(L for L in out if hit < L < prompt_len and L > 0)


def _bucket(n: int, cap: int) -> int:
    return min(1 << max(0, (n - 1).bit_length()), cap) if n > 0 else 1


def prefill_with_cache(model, ids, lengths=None, max_len: int | None = None, fmt: str = "native",
                       prefix_cache: PrefixCache | None = None, chunk_size: int | None = None,
                       store: str = "geometric", info: dict | None = None):
    """Prefill prompts ``ids [B, P]`` (right-padded; ``lengths [B]``, default P) through
    ``prefix_cache``: each row looks up its longest stored aligned prefix and has it restored into
    a fresh ``model.new_cache(B, max_len, fmt)``, then the rows' remainders run together through
    ``model.extend`` (each row from its own position; ``lengths`` per step), stopping at the
    aligned lengths chosen by ``store`` (``checkpoint_lengths``) to store those prefixes.

    Returns (fp32 logits ``[B, vocab]`` at each row's last prompt token, cache with every row at
    position ``lengths[b]``): the same as ``model.prefill(ids, max_len, chunk_size, fmt, lengths)``
    at those positions. Chunks are at most ``chunk_size`` tokens, padded up to a power of two (few
    compiles). ``info`` (a dict, optional) receives ``hits`` (restored length per row) and
    ``stored`` (list of ``(row, length)``)."""
    from v4jax.api import InputError, check_chunk_size, check_token_ids, prompt_lengths

    cfg = model.cfg
    ids = np.asarray(check_token_ids(ids, cfg.vocab_size, cfg.max_seq_len))
    B, P = ids.shape
    lengths = prompt_lengths(lengths, B, P).astype(np.int64)
    max_len = P if max_len is None else int(max_len)
    if max_len < int(lengths.max()):
        raise InputError(f"prefill_with_cache: max_len {max_len} is shorter than the longest prompt "
                         f"({int(lengths.max())} tokens)")
    check_chunk_size(chunk_size)
    cache = model.new_cache(B, max_len, fmt)
    pos = np.zeros((B,), np.int64)
    stops = [[] for _ in range(B)]
    stored = []
    if prefix_cache is not None:
        align = prefix_cache.align_for(cache_layout(cfg, fmt))
        for b in range(B):
            L, state = prefix_cache.lookup(model, ids[b, :lengths[b]], fmt, max_len=max_len)
            if state is not None:
                cache = restore_into(cache, b, state, donate=True)
                pos[b] = L
            stops[b] = checkpoint_lengths(int(lengths[b]), int(pos[b]), align, store)
    hits = pos.copy()
    cap = min(chunk_size or cfg.max_seq_len, cfg.max_seq_len)
    last = [None] * B
    while (pos < lengths).any():
        target = np.array([min([s for s in stops[b] if s > pos[b]] + [int(lengths[b])]) for b in range(B)])
        n = np.minimum(target - pos, cap).astype(np.int32)
        n[pos >= lengths] = 0
        T = _bucket(int(n.max()), cap)
        chunk = np.zeros((B, T), np.int32)
        for b in range(B):
            chunk[b, :n[b]] = ids[b, pos[b]:pos[b] + n[b]]
        logits, cache = model.extend(chunk, cache, n)
        pos = pos + n
        for b in range(B):
            if n[b] and pos[b] == lengths[b]:
                last[b] = logits[b, n[b] - 1]
            if n[b] and prefix_cache is not None and pos[b] in stops[b]:
                try:
                    prefix_cache.store(model, ids[b, :lengths[b]], take_row(model, cache, b, int(pos[b]), fmt),
                                       int(pos[b]))
                except OSError as e:        # a full or read-only disk must not fail the request
                    warnings.warn(f"prefix cache: could not store a {int(pos[b])}-token prefix in "
                                  f"{prefix_cache.directory}: {e}", RuntimeWarning, stacklevel=2)
                    continue
                stored.append((b, int(pos[b])))
    if info is not None:
        info["hits"] = hits.tolist()
        info["stored"] = stored
    return jnp.stack(last), cache


__all__ = ["PrefixCache", "RowState", "CacheLayout", "cache_layout", "layout_of", "take_row", "restore_into",
           "model_fingerprint", "set_model_fingerprint", "config_fingerprint", "weights_fingerprint",
           "bytes_per_token", "entry_payload_bytes", "fixed_state_bytes", "checkpoint_lengths",
           "prefill_with_cache"]
