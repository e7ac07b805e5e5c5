"""``PrefixCache``: the on-disk store (lookup of the longest stored prefix, atomic stores, LRU
eviction to ``max_bytes``, corrupt entries warned about, deleted and treated as misses)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
import warnings

import numpy as np

from v4jax.inference.prefix_cache.entry_file import (_TMP_MAX_AGE_S, _TMP_PREFIX, SUFFIX, CorruptEntry, _read_entry,
                                                     _remove, _write_entry)
from v4jax.inference.prefix_cache.keys import model_fingerprint
from v4jax.inference.prefix_cache.layout import FORMAT_VERSION, CacheLayout, RowState, cache_layout
from v4jax.inference.prefix_cache.rows import take_row

# ---------------------------------------------------------------------------------------------
# the on-disk cache
# ---------------------------------------------------------------------------------------------


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


