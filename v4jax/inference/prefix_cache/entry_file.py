"""The entry file (``<key>.v4pc``): preamble, JSON header with both checksums, then each leaf's
C-order bytes (FP4 packed two per byte); written atomically, verified on every read."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import jax.numpy as jnp
import numpy as np

from v4jax.inference.prefix_cache.layout import FORMAT_VERSION, CacheLayout, RowState, _packable, _u8

MAGIC = b"V4PCACHE"
SUFFIX = ".v4pc"
_TMP_PREFIX = ".tmp-"
_PREAMBLE = struct.Struct("<8sII32s")      # magic, version, header length, header sha256
_TMP_MAX_AGE_S = 3600.0                    # stale temp files (a crashed writer) are removed after this


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


class CorruptEntry(Exception):
    pass


def _remove(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False
