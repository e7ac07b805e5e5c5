"""Greedy document packing into fixed-length rows with per-token segment ids, and the loss masks they imply.

A row has ``row_len = seq_len + 1`` tokens: the model reads ``tokens[:, :T]`` and predicts ``tokens[:, 1:]`` (and MTP
``tokens[:, 2:]``). ``segment_ids`` number the documents inside a row 1, 2, 3, ...; 0 marks padding. The model keeps
attention and compression inside a segment, and the loss ignores targets from another segment or from padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pack_documents(docs: Iterable[Sequence[int]], row_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pack token lists (each already ending in eos) in order, greedily, into rows of ``row_len`` tokens.

    * A document that fits in the current row's free space goes there.
    * One that fits in a row but not in the free space starts a new row (the rest of the current row is padding):
      documents no longer than a row are never split.
    * One longer than a row is split: its first piece fills the current row's free space, then whole rows, and the
      remainder is placed like a short document. Every piece is its own segment.

    Returns ``tokens`` and ``segment_ids``, both int32 ``[n_rows, row_len]``. Deterministic; every token of every
    document appears exactly once, in order.
    """
    if row_len < 1:
        raise ValueError(f"row_len must be >= 1, got {row_len}")
    docs = [np.asarray(d, dtype=np.int32).reshape(-1) for d in docs]
    bound = sum(len(d) for d in docs) // row_len + len(docs) + 1   # each document adds at most one partial row
    tokens = np.full((bound, row_len), pad_id, dtype=np.int32)
    seg = np.zeros((bound, row_len), dtype=np.int32)
    r = c = 0          # current row / column
    s = 1              # next segment id in the current row
    for doc in docs:
        n, i = len(doc), 0
        while i < n:
            space, rem = row_len - c, n - i
            if rem <= space:                      # fits: place the (rest of the) document
                take = rem
            elif rem > row_len:                   # too long for any row: fill the free space with a piece
                take = space
            else:                                 # fits a fresh row only: pad this one out
                r, c, s = r + 1, 0, 1
                continue
            tokens[r, c:c + take] = doc[i:i + take]
            seg[r, c:c + take] = s
            i, c, s = i + take, c + take, s + 1
            if c == row_len:
                r, c, s = r + 1, 0, 1
    n_rows = r + (c > 0)
    return tokens[:n_rows].copy(), seg[:n_rows].copy()


def _xp(x):
    if isinstance(x, np.ndarray):
        return np
    import jax.numpy as jnp
    return jnp


def loss_masks(segment_ids):
    """Masks for the targets of a packed ``[B, T+1]`` row, both ``[B, T]`` bool, aligned with the inputs ``[:, :T]``.

    * ``next_mask[b, t]``: target ``t+1`` is in the same (non-pad) segment as input ``t``.
    * ``mtp_mask[b, t]``: MTP target ``t+2`` (predicted at ``t`` from ``h_t`` and token ``t+1``) is in the same
      segment as ``t``; always False at ``t = T-1``, whose target lies past the row.

    Works on numpy and jax arrays.
    """
    xp = _xp(segment_ids)
    s = segment_ids
    cur = s[..., :-1]
    next_mask = (cur != 0) & (s[..., 1:] == cur)
    mtp = next_mask[..., :-1] & (s[..., 2:] == cur[..., :-1])
    mtp_mask = xp.concatenate([mtp, xp.zeros(mtp.shape[:-1] + (1,), dtype=bool)], axis=-1)
    return next_mask, mtp_mask


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Position of each token inside its segment (0 at each segment start; padding counts like a segment). Numpy."""
    s = np.asarray(segment_ids)
    idx = np.broadcast_to(np.arange(s.shape[-1]), s.shape)
    start = np.ones(s.shape, dtype=bool)
    start[..., 1:] = s[..., 1:] != s[..., :-1]
    return (idx - np.maximum.accumulate(np.where(start, idx, 0), axis=-1)).astype(np.int32)
