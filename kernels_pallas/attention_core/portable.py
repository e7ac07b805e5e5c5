"""Portable wrappers (Triton on GPU; the generic Pallas interpreter on CPU).

Grid ``(B, q_blocks)`` for the forward and ``dq`` kernels, ``(B, key_blocks)`` for the key-side
gradients, with whole per-batch arrays as blocks: each program loops over the key blocks it
needs (``pl.ds`` slices). Top-k rows are a vector gather ``comp_ref[idx]`` (``-1`` slots read a
zero dummy row ``N``); the backward scatters their gradients with ``atomic_add`` into a
zero-initialised aliased ``dcomp`` buffer. ``portable_fwd`` / ``portable_bwd`` are the entry
points used by the custom_vjp in ``vjp.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._common import dot_nn, dot_nt, key_grad, online_update, row_token, softmax_grads
from kernels_pallas.attention_core.plan import F32, AttnCfg, cast, dense_mask, window_mask


def _portable_fwd_kernel(cfg: AttnCfg, *refs):
    if cfg.mode == "window":
        q_ref, qseg_ref, sink_ref, kv_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, qseg_ref, sink_ref, kv_ref, kseg_ref, comp_ref, aux_ref, o_ref, lse_ref = refs
    i = pl.program_id(1)
    R, cd = cfg.R, cfg.dtype
    q = cast(q_ref[...], cfg)
    qseg = qseg_ref[...]
    tq_local = row_token(R, cfg.Hp)
    tq = i * cfg.bq + tq_local
    m = sink_ref[...].astype(F32)
    l = jnp.ones((R, 1), F32)
    acc = jnp.zeros((R, cfg.cp), F32)

    def win(kb, carry):
        start = pl.multiple_of(kb * cfg.bk, cfg.bk)
        k = kv_ref[pl.ds(start, cfg.bk), :]
        s = dot_nt(q, cast(k, cfg)) * cfg.scale
        mask = window_mask(cfg, tq, qseg, start, kseg_ref[:, pl.ds(start, cfg.bk)])
        return online_update(*carry, s, mask, k, cd)

    carry = lax.fori_loop(cfg.win_lo(i), cfg.win_hi(i) + 1, win, (m, l, acc))

    if cfg.mode == "dense":
        def dense(cb, carry):
            start = pl.multiple_of(cb * cfg.bkc, cfg.bkc)
            k = comp_ref[pl.ds(start, cfg.bkc), :]
            s = dot_nt(q, cast(k, cfg)) * cfg.scale
            mask = dense_mask(cfg, tq, qseg, start, aux_ref[:, pl.ds(start, cfg.bkc)])
            return online_update(*carry, s, mask, k, cd)

        carry = lax.fori_loop(0, cfg.n_vis_blocks(i), dense, carry)
    elif cfg.mode == "topk":
        n = cfg.bq * cfg.kc
        col_tok = row_token(n, cfg.kc, axis=1)
        same_tok = col_tok == tq_local  # block-diagonal: row's token == column's token

        def chunk(kk, carry):
            idx = aux_ref[kk, :]  # [bq*kc] token-major
            valid = idx >= 0
            rows = comp_ref[jnp.where(valid, idx, cfg.N), :]  # row N is a zero dummy
            s = dot_nt(q, cast(rows, cfg)) * cfg.scale
            return online_update(*carry, s, same_tok & valid[None, :], rows, cd)

        carry = lax.fori_loop(0, cfg.nck, chunk, carry)
    m, l, acc = carry
    o_ref[...] = acc / l
    lse_ref[...] = m + jnp.log(l)


def _portable_dq_kernel(cfg: AttnCfg, *refs):
    if cfg.mode == "window":
        q_ref, qseg_ref, kv_ref, kseg_ref, do_ref, lse_ref, dt_ref, dq_ref = refs
    elif cfg.mode == "dense":
        q_ref, qseg_ref, kv_ref, kseg_ref, comp_ref, aux_ref, do_ref, lse_ref, dt_ref, dq_ref = refs
    else:
        (q_ref, qseg_ref, kv_ref, kseg_ref, comp_ref, aux_ref, do_ref, lse_ref, dt_ref, _zero_ref,
         dq_ref, dc_ref) = refs
    i = pl.program_id(1)
    R, cd = cfg.R, cfg.dtype
    q = cast(q_ref[...], cfg)
    do = do_ref[...]
    lse = lse_ref[...]
    dterm = dt_ref[...]
    qseg = qseg_ref[...]
    tq_local = row_token(R, cfg.Hp)
    tq = i * cfg.bq + tq_local

    def win(kb, dq):
        start = pl.multiple_of(kb * cfg.bk, cfg.bk)
        k = cast(kv_ref[pl.ds(start, cfg.bk), :], cfg)
        s = dot_nt(q, k) * cfg.scale
        mask = window_mask(cfg, tq, qseg, start, kseg_ref[:, pl.ds(start, cfg.bk)])
        _, ds = softmax_grads(q, do, lse, dterm, s, mask, k, cd)
        return dq + dot_nn(ds.astype(cd), k)

    dq = lax.fori_loop(cfg.win_lo(i), cfg.win_hi(i) + 1, win, jnp.zeros((R, cfg.cp), F32))

    if cfg.mode == "dense":
        def dense(cb, dq):
            start = pl.multiple_of(cb * cfg.bkc, cfg.bkc)
            k = cast(comp_ref[pl.ds(start, cfg.bkc), :], cfg)
            s = dot_nt(q, k) * cfg.scale
            mask = dense_mask(cfg, tq, qseg, start, aux_ref[:, pl.ds(start, cfg.bkc)])
            _, ds = softmax_grads(q, do, lse, dterm, s, mask, k, cd)
            return dq + dot_nn(ds.astype(cd), k)

        dq = lax.fori_loop(0, cfg.n_vis_blocks(i), dense, dq)
    elif cfg.mode == "topk":
        from jax.experimental.pallas import triton as pltriton

        n = cfg.bq * cfg.kc
        same_tok = row_token(n, cfg.kc, axis=1) == tq_local
        cols = lax.broadcasted_iota(jnp.int32, (1, cfg.cp), 1)

        def chunk(kk, dq):
            idx = aux_ref[kk, :]
            valid = idx >= 0
            idxc = jnp.where(valid, idx, cfg.N)  # -1 -> zero dummy row N (its grads are dropped)
            rows = cast(comp_ref[idxc, :], cfg)
            s = dot_nt(q, rows) * cfg.scale
            p, ds = softmax_grads(q, do, lse, dterm, s, same_tok & valid[None, :], rows, cd)
            g = key_grad(p, ds, q, do, cfg.scale, cd)  # [bq*kc, cp]
            if cfg.backend.interpret and cfg.bq > 1:
                # The interpreter's atomic_add is a gather/scatter-set: keep each call free of
                # duplicate rows (one token's list has distinct entries; -1 slots all hit the
                # dummy row with zero updates).
                for t in range(cfg.bq):
                    sl = slice(t * cfg.kc, (t + 1) * cfg.kc)
                    pltriton.atomic_add(dc_ref, (idxc[sl][:, None], cols), g[sl])
            else:
                pltriton.atomic_add(dc_ref, (idxc[:, None], cols), g)
            return dq + dot_nn(ds.astype(cd), rows)

        dq = lax.fori_loop(0, cfg.nck, chunk, dq)
    dq_ref[...] = dq * cfg.scale


def _portable_dkey_kernel(cfg: AttnCfg, dense: bool, *refs):
    """Gradient of one key block (window kv block, or dense compressed block) over the query
    blocks that see it."""
    q_ref, qseg_ref, do_ref, lse_ref, dt_ref, k_ref, kseg_ref, dk_ref = refs
    j = pl.program_id(1)
    R, cd = cfg.R, cfg.dtype
    k = cast(k_ref[...], cfg)
    kseg = kseg_ref[...]
    tq_local = row_token(R, cfg.Hp)
    if dense:
        start = j * cfg.bkc
        lo, hi = cfg.dense_qfirst(j), cfg.nq - 1
        mask_fn = lambda tq, qseg: dense_mask(cfg, tq, qseg, start, kseg)
    else:
        start = j * cfg.bk
        lo, hi = cfg.dkv_qlo(j), cfg.dkv_qhi(j)
        mask_fn = lambda tq, qseg: window_mask(cfg, tq, qseg, start, kseg)

    def body(ib, dk):
        r0 = pl.multiple_of(ib * R, R)
        q = cast(q_ref[pl.ds(r0, R), :], cfg)
        do = do_ref[pl.ds(r0, R), :]
        s = dot_nt(q, k) * cfg.scale
        mask = mask_fn(ib * cfg.bq + tq_local, qseg_ref[pl.ds(r0, R), :])
        p, ds = softmax_grads(q, do, lse_ref[pl.ds(r0, R), :], dt_ref[pl.ds(r0, R), :], s, mask, k, cd)
        return dk + key_grad(p, ds, q, do, cfg.scale, cd)

    dk_ref[...] = lax.fori_loop(lo, hi + 1, body, jnp.zeros(k_ref.shape, F32))


def _portable_params(cfg):
    if cfg.backend.gpu and not cfg.backend.interpret:
        from jax.experimental.pallas import triton as pltriton
        return dict(compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))
    return {}


def _per_batch(shape):
    """BlockSpec of a whole per-batch slab of an array ``[B, *shape]``."""
    nd = len(shape)
    return pl.BlockSpec((None, *shape), lambda b, *_: (b,) + (0,) * nd)


def portable_fwd(cfg: AttnCfg, qr, qseg, sink_rows, kv, kseg, comp, aux):
    B, R, cp = cfg.B, cfg.R, cfg.cp
    qblk = pl.BlockSpec((None, R, cp), lambda b, i: (b, i, 0))
    cblk = pl.BlockSpec((None, R, 1), lambda b, i: (b, i, 0))
    in_specs = [qblk, cblk, pl.BlockSpec((R, 1), lambda b, i: (0, 0)),
                _per_batch((cfg.Tk, cp)), _per_batch((1, cfg.Tk))]
    args = [qr, qseg, sink_rows, kv, kseg]
    if cfg.mode != "window":
        in_specs.append(_per_batch((cfg.Np, cp)))
        args.append(comp)
        if cfg.mode == "dense":
            in_specs.append(_per_batch((1, cfg.Np)))
        else:  # [B, nq, nck, bq*kc]
            in_specs.append(pl.BlockSpec((None, None, cfg.nck, cfg.bq * cfg.kc), lambda b, i: (b, i, 0, 0)))
        args.append(aux)
    return pl.pallas_call(
        functools.partial(_portable_fwd_kernel, cfg),
        grid=(B, cfg.nq),
        in_specs=in_specs,
        out_specs=[qblk, cblk],
        out_shape=[jax.ShapeDtypeStruct((B, cfg.Tp * cfg.Hp, cp), F32),
                   jax.ShapeDtypeStruct((B, cfg.Tp * cfg.Hp, 1), F32)],
        interpret=cfg.backend.interpret_arg,
        name=f"v4_attn_fwd_{cfg.mode}",
        **_portable_params(cfg),
    )(*args)


def portable_bwd(cfg: AttnCfg, qr, qseg, kv, kseg, comp, aux, do, lse, dterm):
    B, R, cp = cfg.B, cfg.R, cfg.cp
    qblk = pl.BlockSpec((None, R, cp), lambda b, i: (b, i, 0))
    cblk = pl.BlockSpec((None, R, 1), lambda b, i: (b, i, 0))
    rows_total = cfg.Tp * cfg.Hp
    params = _portable_params(cfg)

    # ---- dq (and the top-k dcomp scatter)
    in_specs = [qblk, cblk, _per_batch((cfg.Tk, cp)), _per_batch((1, cfg.Tk))]
    args = [qr, qseg, kv, kseg]
    if cfg.mode != "window":
        in_specs.append(_per_batch((cfg.Np, cp)))
        args.append(comp)
        if cfg.mode == "dense":
            in_specs.append(_per_batch((1, cfg.Np)))
        else:
            in_specs.append(pl.BlockSpec((None, None, cfg.nck, cfg.bq * cfg.kc), lambda b, i: (b, i, 0, 0)))
        args.append(aux)
    in_specs += [qblk, cblk, cblk]
    args += [do, lse, dterm]
    out_specs = [qblk]
    out_shape = [jax.ShapeDtypeStruct((B, rows_total, cp), F32)]
    aliases = {}
    if cfg.mode == "topk":
        in_specs.append(_per_batch((cfg.Np, cp)))
        args.append(jnp.zeros((B, cfg.Np, cp), F32))
        out_specs.append(_per_batch((cfg.Np, cp)))
        out_shape.append(jax.ShapeDtypeStruct((B, cfg.Np, cp), F32))
        aliases = {len(args) - 1: 1}
    outs = pl.pallas_call(
        functools.partial(_portable_dq_kernel, cfg),
        grid=(B, cfg.nq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=cfg.backend.interpret_arg,
        name=f"v4_attn_dq_{cfg.mode}",
        **params,
    )(*args)
    dq = outs[0]
    dcomp = outs[1] if cfg.mode == "topk" else None

    # ---- key-side gradients
    full_q = [_per_batch((rows_total, cp)), _per_batch((rows_total, 1)), _per_batch((rows_total, cp)),
              _per_batch((rows_total, 1)), _per_batch((rows_total, 1))]

    def dkey(dense, keys, segs, nblk, blk):
        return pl.pallas_call(
            functools.partial(_portable_dkey_kernel, cfg, dense),
            grid=(B, nblk),
            in_specs=full_q + [pl.BlockSpec((None, blk, cp), lambda b, j: (b, j, 0)),
                               pl.BlockSpec((None, 1, blk), lambda b, j: (b, 0, j))],
            out_specs=pl.BlockSpec((None, blk, cp), lambda b, j: (b, j, 0)),
            out_shape=jax.ShapeDtypeStruct((B, nblk * blk, cp), F32),
            interpret=cfg.backend.interpret_arg,
            name=f"v4_attn_d{'comp' if dense else 'kv'}",
            **params,
        )(qr, qseg, do, lse, dterm, keys, segs)

    dkv = dkey(False, kv, kseg, cfg.nkb, cfg.bk)
    if cfg.mode == "dense":
        dcomp = dkey(True, comp, aux, cfg.ncb, cfg.bkc)
    return dq, dkv, dcomp
