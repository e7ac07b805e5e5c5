"""Checks of what users hand the model (token ids, prompt lengths, chunk sizes) and the one error
they raise, ``InputError``. A leaf of the import graph: the model facade (``v4jax.api``) and the
serving layer (``v4jax.inference``) both import it, neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


class InputError(ValueError):
    """Bad model input (wrong rank, dtype, a token id outside the vocabulary, a sequence longer than
    the model's ``max_seq_len`` or than the cache)."""


def prompt_lengths(lengths, batch: int, width: int) -> np.ndarray:
    """Per-row prompt lengths of right-padded prompts ``[batch, width]`` (default: all ``width``)
    as int32, each in ``[1, width]``."""
    out = np.full((batch,), width, np.int32) if lengths is None else np.asarray(lengths)
    if (out.shape != (batch,) or not np.issubdtype(out.dtype, np.integer) or (out < 1).any()
            or (out > width).any()):
        raise InputError(f"lengths must be {batch} integers in [1, {width}], got {np.asarray(lengths).tolist()}")
    return out.astype(np.int32)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise InputError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")


def check_token_ids(ids: Any, vocab_size: int, max_len: int | None = None, rank: int = 2) -> jnp.ndarray:
    """Validate integer token ids ``[B, T]`` (``rank=1``: ``[B]``, one per sequence) eagerly and
    return them as int32: integer dtype, non-empty, every id in ``[0, vocab_size)``, and with
    ``max_len`` at most that many tokens per sequence."""
    shape_name = "[batch, seq]" if rank == 2 else "[batch]"
    if isinstance(ids, (list, tuple)):
        ids = np.asarray(ids)
    if not hasattr(ids, "dtype") or not hasattr(ids, "shape"):
        raise InputError(f"token ids must be an integer array {shape_name}, got {type(ids).__name__}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise InputError(f"token ids must have an integer dtype, got {ids.dtype}")
    if ids.ndim != rank:
        raise InputError(f"token ids must have rank {rank} {shape_name}, got shape {tuple(ids.shape)}")
    if min(ids.shape) < 1:
        raise InputError(f"token ids must be non-empty, got shape {tuple(ids.shape)}")
    if max_len is not None and rank == 2 and ids.shape[1] > max_len:
        raise InputError(f"sequence length {ids.shape[1]} exceeds the model's max_seq_len {max_len}")
    host = np.asarray(ids)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(host == bad)[0])
        raise InputError(f"token id {bad} at position {where} is outside the vocabulary [0, {vocab_size})")
    return jnp.asarray(host, jnp.int32)


__all__ = ["InputError", "prompt_lengths", "check_chunk_size", "check_token_ids"]
