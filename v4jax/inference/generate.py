"""Autoregressive generation (spec 6): prefill (or a prefix-cache restore), then one decode step
per token, with stop tokens and streaming; ``speculative="mtp"`` hands over to
``v4jax.inference.speculative``.

The serving layer works on a model object (``v4jax.V4Model``: ``cfg``, ``variables``, ``prefill``,
``extend``, ``new_cache`` and the jitted ``_decode``) that it is given; it never imports the facade
(``v4jax.api``), which calls down into it (``V4Model.generate``). Input checks come from
``v4jax.inputs``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.inference.prefix_cache import prefill_with_cache
from v4jax.inference.sampling import sample_next
from v4jax.inference.speculative import generate_speculative
from v4jax.inputs import InputError, check_chunk_size, prompt_lengths


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_tokens=None, chunk_size: int | None = None,
             on_token=None, lengths=None, cache_format: str = "native", speculative: str | None = None,
             stats: dict | None = None, prefix_cache=None) -> np.ndarray:
    """``model.generate``: see ``v4jax.api.V4Model.generate`` for the arguments. Returns the new
    token ids ``[B, n <= max_new_tokens]`` (int32, numpy)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0 or not (0 < top_p <= 1):
        raise InputError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    stop = (model.cfg.eos_token_id,) if stop_tokens is None else tuple(stop_tokens)
    ids = model._ids(ids)
    B, P = ids.shape
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise InputError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} exceeds "
                         f"the model's max_seq_len {model.cfg.max_seq_len}")
    lengths = np.full((B,), P, np.int32) if lengths is None else np.asarray(lengths)
    if speculative is not None and prefix_cache is not None:
        raise InputError("speculative='mtp' and prefix_cache cannot be combined yet (the prefix cache holds the "
                         "main model's cache, not the MTP block's); use one of them")
    if speculative is not None:
        if speculative != "mtp":
            raise InputError(f"speculative must be None or 'mtp', got {speculative!r}")
        if not model.cfg.n_mtp_layers:
            raise InputError("speculative='mtp' needs a model with an MTP block; this config has n_mtp_layers = 0")
        check_chunk_size(chunk_size)
        if cache_format not in ("native", "fp8"):
            raise InputError(f"cache format must be 'native' or 'fp8', got {cache_format!r}")
        return generate_speculative(model, ids, prompt_lengths(lengths, B, P), int(max_new_tokens), float(temperature),
                                    float(top_p), seed, stop, chunk_size, on_token, cache_format, stats)
    if prefix_cache is not None:
        last, cache = prefill_with_cache(model, ids, lengths, P + max_new_tokens, cache_format, prefix_cache,
                                         chunk_size)                           # checks lengths
    else:
        logits, cache = model.prefill(ids, P + max_new_tokens, chunk_size, cache_format, lengths)   # checks lengths
        last = logits[jnp.arange(B), jnp.asarray(lengths, np.int32) - 1]
        del logits
    lengths = lengths.astype(np.int32)
    key = jax.random.key(seed)
    temperature, top_p = float(temperature), float(top_p)
    tok = sample_next(last, jax.random.fold_in(key, 0), temperature, top_p)
    del last
    done = np.zeros(B, bool)
    fill = np.zeros(B, np.int32)
    out = []
    for step in range(max_new_tokens):
        # the next step is dispatched before this one's tokens reach the host, so the device
        # never waits on the Python loop (a finished row's extra token is overwritten below)
        nxt = None
        if step < max_new_tokens - 1:
            nxt, _, cache = model._decode(model.variables, tok, cache, jax.random.fold_in(key, step + 1),
                                          temperature=temperature, top_p=top_p)
        host = np.where(done, fill, np.asarray(tok)).astype(np.int32)
        out.append(host)
        if on_token is not None:
            on_token(step, host)
        hit = np.isin(host, stop) & ~done
        fill = np.where(hit, host, fill)
        done |= hit
        if done.all() or nxt is None:
            break
        tok = nxt
    return np.stack(out, axis=1)
