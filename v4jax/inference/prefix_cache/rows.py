"""One sequence's cache state: taken out of a batched cache (``take_row``, the entries cut to the
rows that exist) and put back into a fresh cache row (``restore_into``), bit-exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.inference.prefix_cache.layout import RowState, _path_str, layout_of

# ---------------------------------------------------------------------------------------------
# one sequence's state: take it out of a batched cache, put it into one
# ---------------------------------------------------------------------------------------------


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
