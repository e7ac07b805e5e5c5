"""Streaming safetensors access (spec 8 dtypes): read one tensor at a time, write one at a time.

Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
(offsets relative to the end of the header) and the raw little-endian data. Reading uses
``safetensors.safe_open(..., framework="numpy")`` for the dtypes numpy knows; the float8 family
(``F8_E4M3``, ``F8_E5M2``, ``F8_E8M0``) and ``F4`` are read from a memory map of the file with the
``ml_dtypes`` types, since safetensors' numpy backend cannot name them. Writing goes straight to
the file: the header is computed first from the shapes, then each tensor is produced, written
and dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
assert sys.byteorder == "little", "safetensors data is little-endian; big-endian hosts are not supported"
_SAFE_OPEN_OK = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str          # safetensors dtype string
    shape: tuple[int, ...]
    begin: int          # absolute byte offsets in the file
    end: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parse a safetensors header without touching the data: ``({name: TensorInfo}, metadata)``."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
    start = 8 + n
    meta = header.pop("__metadata__", {}) or {}
    infos = {k: TensorInfo(k, path, v["dtype"], tuple(v["shape"]), start + v["data_offsets"][0],
                           start + v["data_offsets"][1]) for k, v in header.items()}
    return infos, meta


class SafetensorsFile:
    """One file: header parsed eagerly, data read lazily tensor by tensor (close() when done)."""

    def __init__(self, path: str):
        self.path = path
        self.tensors, self.metadata = read_header(path)
        self._safe = None
        self._mmap = None

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info.dtype in _SAFE_OPEN_OK:
            if self._safe is None:
                self._safe = safe_open(self.path, framework="numpy")
            try:
                return self._safe.get_tensor(name)
            except (TypeError, AttributeError):  # a numpy dtype name safetensors cannot resolve
                pass
        return self._raw(info)

    def _raw(self, info: TensorInfo) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        data = self._mmap[info.begin:info.end]
        if info.dtype == "F4":  # packed e2m1 pairs: return the bytes [..., n/2] like an I8 tensor
            return np.array(data).reshape(*info.shape[:-1], -1)
        if info.dtype not in DTYPES:
            raise ValueError(f"{self.path}: tensor {info.name!r} has unsupported dtype {info.dtype}")
        return np.array(data).view(DTYPES[info.dtype]).reshape(info.shape)

    def close(self):
        if self._safe is not None:
            with contextlib.suppress(Exception):
                self._safe.__exit__(None, None, None)
        self._safe = None
        self._mmap = None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name, dtype, shape and a callable producing it (called once)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_file(path: str, tensors: Iterable[PendingTensor], metadata: dict | None = None) -> int:
    """Write one safetensors file, producing and writing each tensor in turn. Returns data bytes."""
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for t in tensors:
        dt = np.dtype(t.dtype)
        if dt not in DTYPE_NAMES:
            raise ValueError(f"cannot write dtype {dt} ({t.name})")
        header[t.name] = {"dtype": DTYPE_NAMES[dt], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for t in tensors:
            a = np.ascontiguousarray(np.asarray(t.produce()).astype(t.dtype, copy=False))
            if a.shape != tuple(t.shape):
                raise ValueError(f"{t.name}: produced shape {a.shape}, declared {tuple(t.shape)}")
            f.write(a.tobytes())  # little-endian host (asserted at import)
            del a
    os.replace(tmp, path)
    return off


def write_checkpoint(dirpath: str, tensors: Iterable[PendingTensor], shard_bytes: int | None = None) -> list[str]:
    """Write ``model.safetensors`` or, with ``shard_bytes``, ``model-0000k-of-0000n.safetensors``
    shards (greedy, a tensor never split) plus ``model.safetensors.index.json``. Returns the files."""
    tensors = list(tensors)
    os.makedirs(dirpath, exist_ok=True)
    if not shard_bytes:
        write_file(os.path.join(dirpath, "model.safetensors"), tensors)
        return ["model.safetensors"]
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        total += write_file(os.path.join(dirpath, fname), shard)
        weight_map.update({t.name: fname for t in shard})
    with open(os.path.join(dirpath, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def write_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Small helper: write a dict of in-memory arrays (any dtype in ``DTYPES``) to one file."""
    write_file(path, [PendingTensor(k, v.dtype, v.shape, (lambda v=v: v)) for k, v in arrays.items()])
