"""Greedy document packing into fixed-length rows with per-token segment ids, and the loss masks they imply.

A row has ``row_len = seq_len + 1`` tokens: the model reads ``tokens[:, :T]`` and predicts ``tokens[:, 1:]`` (and MTP
``tokens[:, 2:]``). ``segment_ids`` number the documents inside a row 1, 2, 3, ...; 0 marks padding. The model keeps
attention and compression inside a segment, and the loss ignores targets from another segment or from padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class RowPacker:
    """The streaming form of ``pack_documents``: ``add(doc)`` returns the rows it completed, ``finish()`` the
    last partial row (if any). Feeding the same documents gives the same rows as ``pack_documents``, without
    holding the corpus in memory (``v4jax.data.shards`` writes the rows to array_record as they come)."""

    def __init__(self, row_len: int, pad_id: int = 0):
        if row_len < 1:
            raise ValueError(f"row_len must be >= 1, got {row_len}")
        self.row_len, self.pad_id = int(row_len), int(pad_id)
        self._new_row()

    def _new_row(self):
        self._tok = np.full(self.row_len, self.pad_id, dtype=np.int32)
        self._seg = np.zeros(self.row_len, dtype=np.int32)
        self._c, self._s = 0, 1          # next column, next segment id in the current row

    def _emit(self, out):
        out.append((self._tok, self._seg))
        self._new_row()

    def add(self, doc: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Place one document (already ending in eos); returns the rows completed, ``(tokens, segment_ids)``."""
        doc = np.asarray(doc, dtype=np.int32).reshape(-1)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        n, i, L = len(doc), 0, self.row_len
        while i < n:
            space, rem = L - self._c, n - i
            if rem <= space:                      # fits: place the (rest of the) document
                take = rem
            elif rem > L:                         # too long for any row: fill the free space with a piece
                take = space
            else:                                 # fits a fresh row only: pad this one out
                self._emit(out)
                continue
            self._tok[self._c:self._c + take] = doc[i:i + take]
            self._seg[self._c:self._c + take] = self._s
            i, self._c, self._s = i + take, self._c + take, self._s + 1
            if self._c == L:
                self._emit(out)
        return out

    def finish(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The last, partial row (padding after its documents), or nothing if the rows came out even."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        if self._c > 0:
            self._emit(out)
        return out


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
    packer = RowPacker(row_len, pad_id)
    rows = [r for d in docs for r in packer.add(d)] + packer.finish()
    if not rows:
        return np.zeros((0, row_len), np.int32), np.zeros((0, row_len), np.int32)
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


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
