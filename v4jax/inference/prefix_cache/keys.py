"""The model's part of an entry's key: its fingerprint (canonical JSON of the config and a hash of
every weight's bytes, dtype and shape), memoised per model object."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from v4jax.config import V4Config
from v4jax.inference.prefix_cache.layout import FORMAT_VERSION, _path_str, _u8

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
