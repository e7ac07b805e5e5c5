"""Batched prefill through the prefix cache: each row restores its longest stored aligned prefix,
then the remainders run together through ``model.extend``, stopping at the aligned lengths that are
stored (``checkpoint_lengths``). Called by ``v4jax.inference.generate`` (``prefix_cache=``)."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

from v4jax.inference.prefix_cache.layout import cache_layout
from v4jax.inference.prefix_cache.rows import restore_into, take_row
from v4jax.inference.prefix_cache.store import PrefixCache
from v4jax.inputs import InputError, check_chunk_size, check_token_ids, prompt_lengths

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
