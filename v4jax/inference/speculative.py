"""Self-speculative decoding with the MTP block (issue #14): V4's multi-token-prediction head drafts
the token after next, one ``extend`` of the main model over ``[pending, draft]`` verifies it.

State after each step, per sequence (``n`` = tokens the main cache holds): the main cache at
``pos = n``; the pending token ``x_n`` (chosen, not yet run through the model); the MTP cache at
``pos = n`` (MTP position ``t`` consumed the main streams ``H_t`` and ``x_{t+1}``); the draft ``d``
for ``x_{n+1}`` (with its draft distribution ``q`` when sampling). A step:

1. verify: main ``extend([x_n, d])`` at positions ``n, n+1`` -> logits ``L_n`` (for ``x_{n+1}``) and
   ``L_{n+1}`` (for ``x_{n+2}``), streams ``H_n, H_{n+1}``;
2. accept: greedy, ``d == argmax L_n``; sampling, the standard rule (Leviathan et al. 2023; Chen et
   al. 2023): accept with probability ``min(1, p(d) / q(d))``, else draw from ``max(p - q, 0)``
   normalised, so every emitted token has exactly the model's distribution ``p`` (temperature and
   top-p filtering applied to ``p`` and ``q`` alike). An accepted draft also yields the bonus token
   ``x_{n+2}`` from ``L_{n+1}``: 2 tokens for one main-model pass, else 1;
3. roll back: the main cache's ``pos`` becomes ``n + 1 + accepted``. That is the whole rollback: every
   cache leaf is position-indexed (window rings, the compressors' row rings, compressed entries
   visible only to queries past their block, ``v4jax.attention.compressor``), so what the rejected
   token wrote is never read before it is overwritten;
4. draft: the MTP block over positions ``n`` (and ``n + 1`` when accepted), fed the streams from 1.
   and the tokens chosen in 2., gives the next draft. MTP positions are only ever fed accepted
   tokens, so its cache needs no rollback.

Rows of a batch accept independently (``n_valid`` per row). Everything per step is one jitted
function of fixed shapes (one compile per batch size, cache length and sampling setting).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.inference.sampling import sample_next
from v4jax.model.transformer import init_mtp_cache
from v4jax.parallel.mesh import replicated, under_mesh


def filtered_probs(logits: jnp.ndarray, temperature: float, top_p: float) -> jnp.ndarray:
    """The distribution ``choose_next`` samples from: ``softmax(logits / temperature)`` restricted to
    the nucleus (``top_p``), fp32 ``[B, V]``."""
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.nn.softmax(logits, axis=-1)


def _draw(key, probs):
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def _pick(logits, key, temperature, top_p):
    """-> (token [B], its distribution [B, V] or None when greedy)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    q = filtered_probs(logits, temperature, top_p)
    return _draw(key, q), q


def draft_tokens(logits, key, temperature: float, top_p: float, positions):
    """The draft for absolute position ``positions [B]`` from the MTP block's logits ``[B, V]``
    -> (tokens, draft distribution or None). A seam: tests swap in an oracle drafter to drive
    chosen accept / reject patterns through the real caches."""
    return _pick(logits, key, temperature, top_p)


def _last(x, n):
    """``x [B, T, ...]`` at index ``n[b] - 1`` per row."""
    return x[jnp.arange(x.shape[0]), jnp.maximum(n, 1) - 1]


def spec_step(module, variables, state: dict, key, stop: jnp.ndarray, temperature: float, top_p: float):
    """One speculative step for every active row -> (new state, tokens ``[B, 2]``, count ``[B]``:
    the first ``count[b]`` tokens of row b were emitted). ``state``: ``cache``, ``mtp_cache``,
    ``tok`` (pending), ``draft``, ``q`` (draft distribution; sampling only), ``left`` (tokens a row
    may still emit), ``stopped``; ``stop``: stop-token ids ``[S]``."""
    B = state["tok"].shape[0]
    active = (state["left"] > 0) & ~state["stopped"]
    act = active.astype(jnp.int32)
    n = state["cache"]["pos"]
    chunk = jnp.stack([state["tok"], state["draft"]], axis=1)
    out = module.apply(variables, chunk, state["cache"], 2 * act, method="extend")
    logits, hidden, cache = out["logits"], out["hidden"], out["cache"]
    k_acc, k_res, k_bonus, k_draft = jax.random.split(key, 4)
    d = state["draft"]
    if temperature == 0.0:
        first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        acc = first == d
        bonus = jnp.argmax(logits[:, 1], axis=-1).astype(jnp.int32)
    else:
        p0 = filtered_probs(logits[:, 0], temperature, top_p)
        q = state["q"]
        rows = jnp.arange(B)
        u = jax.random.uniform(k_acc, (B,))
        acc = u * q[rows, d] < p0[rows, d]                         # u < p(d) / q(d); q(d) > 0: d ~ q
        resid = jnp.maximum(p0 - q, 0.0)
        mass = jnp.sum(resid, axis=-1, keepdims=True)
        resid = jnp.where(mass > 0, resid / jnp.maximum(mass, 1e-30), p0)   # p == q: never rejected
        first = jnp.where(acc, d, _draw(k_res, resid))
        bonus = _draw(k_bonus, filtered_probs(logits[:, 1], temperature, top_p))
    acc = acc & active
    count = act * (1 + acc.astype(jnp.int32))
    # a stop token as the first emitted token ends the row there (its bonus token is not emitted)
    first_stops = jnp.isin(first, stop)
    count = jnp.where(first_stops & active, 1, count)
    acc = acc & ~first_stops
    cache = {**cache, "pos": n + count}                           # the rollback
    toks = jnp.stack([first, bonus], axis=1)
    emitted = jnp.isin(toks, stop) & (jnp.arange(2)[None] < count[:, None])
    m = module.apply(variables, hidden, toks, state["mtp_cache"], count, method="mtp_extend")
    draft, q = draft_tokens(_last(m["logits"], count), k_draft, temperature, top_p, n + count + 1)
    new = {"cache": cache, "mtp_cache": m["cache"], "tok": jnp.where(acc, bonus, first),
           "draft": jnp.where(active, draft, state["draft"]), "left": state["left"] - count,
           "stopped": state["stopped"] | jnp.any(emitted, axis=1)}
    if q is not None:
        new["q"] = jnp.where(active[:, None], q, state["q"])
    return new, toks, count


def mtp_prefill(module, variables, hidden, next_ids, mtp_cache, n_valid, key, temperature: float, top_p: float):
    """The MTP block over a prompt chunk (streams ``hidden``, the tokens after them ``next_ids``)
    -> (draft after its last real position, its distribution or None, new MTP cache)."""
    m = module.apply(variables, hidden, next_ids, mtp_cache, n_valid, method="mtp_extend")
    draft, q = draft_tokens(_last(m["logits"], n_valid), key, temperature, top_p, m["cache"]["pos"] + 1)
    return draft, q, m["cache"]


def _jitted(model):
    """The jitted pieces, built once per model (``V4Model`` keeps them)."""
    fns = getattr(model, "_spec_fns", None)
    if fns is None:
        wrap = (lambda f: f) if model.mesh is None else (lambda f: under_mesh(f, model.mesh))

        def extend_h(variables, ids, cache, n_valid):
            out = model.module.apply(variables, ids, cache, n_valid, method="extend")
            return out["logits"], out["hidden"], out["cache"]

        fns = {"extend": wrap(jax.jit(extend_h, donate_argnums=(2,))),
               "mtp": wrap(jax.jit(partial(mtp_prefill, model.module), donate_argnums=(3,),
                                   static_argnames=("temperature", "top_p"))),
               "step": wrap(jax.jit(partial(spec_step, model.module), donate_argnums=(1,),
                                    static_argnames=("temperature", "top_p")))}
        model._spec_fns = fns
    return fns


def generate_speculative(model, ids, lengths, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                         stop: tuple, chunk_size, on_token, cache_format: str, stats: dict | None = None) -> np.ndarray:
    """``V4Model.generate(..., speculative="mtp")``: same arguments and return as ``generate``
    (inputs already checked there). ``stats`` (a dict, optional) receives ``steps``, ``drafted``,
    ``accepted`` and ``acceptance`` (accepted / drafted over the active rows)."""
    if not model.cfg.n_mtp_layers:
        raise ValueError("speculative='mtp' needs a model with an MTP block (n_mtp_layers >= 1); this config has "
                         "n_mtp_layers = 0")
    fns = _jitted(model)
    B, P = ids.shape
    max_len = P + max_new_tokens
    dt = jnp.dtype(model.cfg.dtype)
    cache = model.new_cache(B, max_len, cache_format)
    mcache = init_mtp_cache(model.cfg, B, max_len, dt, cache_format)
    if model.mesh is not None:       # one small block: replicated

        mcache = jax.device_put(mcache, replicated(model.mesh))
    lengths = np.asarray(lengths, np.int32)
    chunk_size = chunk_size or P
    hid, last_logits = [], None
    for s in range(0, P, chunk_size):
        chunk = ids[:, s:s + chunk_size]
        n = np.clip(lengths - s, 0, chunk.shape[1]).astype(np.int32)
        logits, h, cache = fns["extend"](model.variables, chunk, cache, jnp.asarray(n))
        hid.append(h)
        sel = (lengths - 1 >= s) & (lengths - 1 < s + chunk.shape[1])
        li = logits[jnp.arange(B), jnp.asarray(np.clip(lengths - 1 - s, 0, chunk.shape[1] - 1))]
        last_logits = li if last_logits is None else jnp.where(jnp.asarray(sel)[:, None], li, last_logits)
    key = jax.random.key(seed)
    tok = sample_next(last_logits, jax.random.fold_in(key, 0), temperature, top_p)
    # the MTP block over the prompt: position t gets H_t and x_{t+1} (x_P = tok at each row's end)
    nxt = np.concatenate([np.asarray(ids[:, 1:]), np.zeros((B, 1), np.int32)], axis=1)
    nxt[np.arange(B), lengths - 1] = np.asarray(tok)
    nxt = jnp.asarray(nxt)
    draft = q = None
    for i, s in enumerate(range(0, P, chunk_size)):
        n = np.clip(lengths - s, 0, hid[i].shape[1]).astype(np.int32)
        d, qq, mcache = fns["mtp"](model.variables, hid[i], nxt[:, s:s + chunk_size], mcache, jnp.asarray(n),
                                   jax.random.fold_in(key, 1 + i), temperature=temperature, top_p=top_p)
        has = jnp.asarray((lengths - 1 >= s) & (lengths - 1 < s + hid[i].shape[1]))
        draft = d if draft is None else jnp.where(has, d, draft)
        if qq is not None:
            q = qq if q is None else jnp.where(has[:, None], qq, q)
    del hid
    stop_arr = jnp.asarray(np.asarray(stop if stop else (-1,), np.int32))
    first_stopped = jnp.isin(tok, stop_arr)
    state = {"cache": cache, "mtp_cache": mcache, "tok": tok, "draft": draft,
             "left": jnp.full((B,), max_new_tokens - 1, jnp.int32), "stopped": first_stopped}
    if q is not None:
        state["q"] = q
    rows = [[int(t)] for t in np.asarray(tok)]
    done = np.array([bool(stop) and r[0] in stop for r in rows])
    counters = {"steps": 0, "drafted": 0, "accepted": 0, "streamed": 0}

    def finished(b):
        return done[b] or len(rows[b]) >= max_new_tokens

    def apply(res):
        toks, count = (np.asarray(x) for x in res)
        counters["steps"] += 1
        for b in range(B):
            c = int(count[b])
            if c == 0 or finished(b):
                continue
            counters["drafted"] += 1
            counters["accepted"] += int(c == 2)
            for t in toks[b, :c]:
                if finished(b):
                    break
                rows[b].append(int(t))
                done[b] = bool(stop) and int(t) in stop
        stream()

    def stream():
        """``on_token(i, tokens[B])`` once every row has its i-th token (or has finished)."""
        if on_token is None:
            return
        while True:
            i = counters["streamed"]
            if not all(len(r) > i or finished(b) for b, r in enumerate(rows)):
                return
            if all(len(r) <= i for r in rows):
                return
            on_token(i, np.array([r[i] if len(r) > i else r[-1] for r in rows], np.int32))
            counters["streamed"] += 1

    stream()
    prev, step_i = None, 0
    while True:
        if all(finished(b) for b in range(B)):
            if prev is None:
                break
            apply(prev)
            prev = None
            continue
        # the next step is dispatched before the previous one's tokens reach the host (the device
        # keeps its own per-row budget and stop flags, so a step for a finished row emits nothing)
        state, toks, count = fns["step"](model.variables, state, jax.random.fold_in(key, 1000 + step_i), stop_arr,
                                        temperature=temperature, top_p=top_p)
        step_i += 1
        if prev is not None:
            apply(prev)
        prev = (toks, count)
    n_out = max(len(r) for r in rows)
    out = np.array([r + [r[-1]] * (n_out - len(r)) for r in rows], np.int32)
    if stats is not None:
        stats.update(steps=counters["steps"], drafted=counters["drafted"], accepted=counters["accepted"],
                     acceptance=counters["accepted"] / max(counters["drafted"], 1))
    return out
