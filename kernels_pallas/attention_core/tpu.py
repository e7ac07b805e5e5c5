"""TPU (Mosaic) kernels and wrappers.

Grid ``(B, q_blocks, steps)``: the steps walk the window kv blocks, then the dense compressed
blocks, or one extra step for the top-k gather; key blocks arrive through BlockSpec pipelining
(index maps clamp to the blocks a query block needs, so nothing else is fetched) and m/l/acc
live in VMEM scratch. Top-k: the index block of the current query block is streamed into SMEM
(addresses) and VMEM (validity mask), and ONLY the selected compressed rows are fetched, with
double-buffered per-row DMAs from HBM. The backward scatter-adds the top-k gradient rows into a
VMEM-resident ``dcomp`` (row read-modify-write, sequential over q blocks; one pass per
``dcr``-row chunk when it does not fit). ``tpu_fwd`` / ``tpu_bwd`` are the entry points used by
the custom_vjp in ``vjp.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._common import (dot_nn, dot_nt, idiv, imod, key_grad, online_update, round_up, row_token,
                                    softmax_grads)
from kernels_pallas.attention_core.plan import F32, AttnCfg, cast, dense_mask, window_mask


def _tpu_sparse_walk(cfg: AttnCfg, b, tks_ref, comp_hbm, buf, sem, process):
    """Walk (token, chunk) steps of the current query block; for each, DMA the chunk's selected
    compressed rows (skipping -1 slots) into ``buf[slot]`` (double-buffered) and call
    ``process(tt, kk, slot)``."""
    from jax.experimental.pallas import tpu as pltpu

    nck, kc, Kp = cfg.nck, cfg.kc, cfg.Kp
    total = cfg.bq * nck

    def copies(step, slot, start: bool):
        base = idiv(step, nck) * Kp + imod(step, nck) * kc

        def body(k, c):
            e = tks_ref[base + k]

            @pl.when(e >= 0)
            def _():
                cp_ = pltpu.make_async_copy(comp_hbm.at[b, pl.ds(e, 1), :], buf.at[slot, pl.ds(k, 1), :],
                                            sem.at[slot])
                if start:
                    cp_.start()
                else:
                    cp_.wait()
            return c

        lax.fori_loop(0, kc, body, 0)

    buf[...] = jnp.zeros(buf.shape, buf.dtype)  # skipped slots must hold finite values
    copies(0, 0, True)

    def step_body(step, c):
        slot = imod(step, 2)

        @pl.when(step + 1 < total)
        def _():
            copies(step + 1, 1 - slot, True)

        copies(step, slot, False)
        process(idiv(step, nck), imod(step, nck), slot)
        return c

    lax.fori_loop(0, total, step_body, 0)


def _tpu_fwd_kernel(cfg: AttnCfg, nsteps: int, *refs):
    it = iter(refs)
    q_ref, qseg_ref, sink_ref, kv_ref, kseg_ref = (next(it) for _ in range(5))
    if cfg.mode == "dense":
        comp_ref, cseg_ref = next(it), next(it)
    elif cfg.mode == "topk":
        tks_ref, tkv_ref, comp_hbm = next(it), next(it), next(it)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = (next(it) for _ in range(5))
    if cfg.mode == "topk":
        buf, sem = next(it), next(it)
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    R, Hp, cd = cfg.R, cfg.Hp, cfg.dtype

    @pl.when(j == 0)
    def _():
        m_ref[...] = sink_ref[...]
        l_ref[...] = jnp.ones((R, 1), F32)
        acc_ref[...] = jnp.zeros((R, cfg.cp), F32)

    def update(k, mask_fn):
        q = cast(q_ref[...], cfg)
        tq = i * cfg.bq + row_token(R, Hp)
        s = dot_nt(q, cast(k, cfg)) * cfg.scale
        m, l, acc = online_update(m_ref[...], l_ref[...], acc_ref[...], s, mask_fn(tq, qseg_ref[...]), k, cd)
        m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

    kb = cfg.win_lo(i) + j

    @pl.when((j < cfg.nw) & (kb <= cfg.win_hi(i)))
    def _():
        update(kv_ref[...], lambda tq, qs: window_mask(cfg, tq, qs, kb * cfg.bk, kseg_ref[...]))

    if cfg.mode == "dense":
        cb = j - cfg.nw

        @pl.when((j >= cfg.nw) & (cb < cfg.n_vis_blocks(i)))
        def _():
            update(comp_ref[...], lambda tq, qs: dense_mask(cfg, tq, qs, cb * cfg.bkc, cseg_ref[...]))

    elif cfg.mode == "topk":
        @pl.when(j == cfg.nw)
        def _():
            def process(tt, kk, slot):
                r0 = pl.multiple_of(tt * Hp, Hp)
                rows = buf[slot]
                qt = cast(q_ref[pl.ds(r0, Hp), :], cfg)
                s = dot_nt(qt, cast(rows, cfg)) * cfg.scale
                valid = tkv_ref[pl.ds(tt * cfg.nck + kk, 1), :] >= 0
                m, l, acc = online_update(m_ref[pl.ds(r0, Hp), :], l_ref[pl.ds(r0, Hp), :],
                                          acc_ref[pl.ds(r0, Hp), :], s, valid, rows, cd)
                m_ref[pl.ds(r0, Hp), :] = m
                l_ref[pl.ds(r0, Hp), :] = l
                acc_ref[pl.ds(r0, Hp), :] = acc

            _tpu_sparse_walk(cfg, b, tks_ref, comp_hbm, buf, sem, process)

    @pl.when(j == nsteps - 1)
    def _():
        l = l_ref[...]
        o_ref[...] = acc_ref[...] / l
        lse_ref[...] = m_ref[...] + jnp.log(l)


def _tpu_dq_kernel(cfg: AttnCfg, nsteps: int, want_dq: bool, want_dc: bool, *refs):
    """dq (window, dense or top-k keys) and/or the top-k dcomp scatter.

    ``want_dc``: grid (B, dcomp chunks, nq, steps); the chunk's fp32 dcomp rows [n0, n0 + dcr)
    stay resident in VMEM while the q blocks are walked sequentially, and every selected row's
    gradient ``p^T do + scale ds^T q`` is added with a row read-modify-write. Otherwise the grid
    is (B, nq, steps)."""
    it = iter(refs)
    q_ref, qseg_ref, kv_ref, kseg_ref = (next(it) for _ in range(4))
    if cfg.mode == "dense":
        comp_ref, cseg_ref = next(it), next(it)
    elif cfg.mode == "topk":
        tks_ref, tkv_ref, comp_hbm = next(it), next(it), next(it)
    do_ref, lse_ref, dt_ref = (next(it) for _ in range(3))
    dq_ref = next(it) if want_dq else None
    dc_ref = next(it) if want_dc else None
    dq_acc = next(it) if want_dq else None
    if cfg.mode == "topk":
        buf, sem, g_ref = next(it), next(it), next(it)
    if want_dc:
        b, ch, i, j = (pl.program_id(a) for a in range(4))
        n0 = ch * cfg.dcr
    else:
        b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    R, Hp, cd = cfg.R, cfg.Hp, cfg.dtype

    if want_dq:
        @pl.when(j == 0)
        def _():
            dq_acc[...] = jnp.zeros((R, cfg.cp), F32)

    if want_dc:
        @pl.when((i == 0) & (j == 0))
        def _():
            dc_ref[...] = jnp.zeros(dc_ref.shape, F32)

    def update(k, mask_fn):
        q = cast(q_ref[...], cfg)
        k = cast(k, cfg)
        tq = i * cfg.bq + row_token(R, Hp)
        s = dot_nt(q, k) * cfg.scale
        _, ds = softmax_grads(q, do_ref[...], lse_ref[...], dt_ref[...], s, mask_fn(tq, qseg_ref[...]), k, cd)
        dq_acc[...] += dot_nn(ds.astype(cd), k)

    sparse_step = cfg.nw if want_dq else 0
    if want_dq:
        kb = cfg.win_lo(i) + j

        @pl.when((j < cfg.nw) & (kb <= cfg.win_hi(i)))
        def _():
            update(kv_ref[...], lambda tq, qs: window_mask(cfg, tq, qs, kb * cfg.bk, kseg_ref[...]))

        if cfg.mode == "dense":
            cb = j - cfg.nw

            @pl.when((j >= cfg.nw) & (cb < cfg.n_vis_blocks(i)))
            def _():
                update(comp_ref[...], lambda tq, qs: dense_mask(cfg, tq, qs, cb * cfg.bkc, cseg_ref[...]))

    if cfg.mode == "topk":
        @pl.when(j == sparse_step)
        def _():
            def process(tt, kk, slot):
                r0 = pl.multiple_of(tt * Hp, Hp)
                rows = cast(buf[slot], cfg)
                qt = cast(q_ref[pl.ds(r0, Hp), :], cfg)
                dot_ = do_ref[pl.ds(r0, Hp), :]
                s = dot_nt(qt, rows) * cfg.scale
                valid = tkv_ref[pl.ds(tt * cfg.nck + kk, 1), :] >= 0
                p, ds = softmax_grads(qt, dot_, lse_ref[pl.ds(r0, Hp), :], dt_ref[pl.ds(r0, Hp), :], s, valid,
                                      rows, cd)
                if want_dq:
                    dq_acc[pl.ds(r0, Hp), :] += dot_nn(ds.astype(cd), rows)
                if want_dc:
                    g_ref[...] = key_grad(p, ds, qt, dot_, cfg.scale, cd)
                    base = tt * cfg.Kp + kk * cfg.kc

                    def scatter(k, c):
                        e = tks_ref[base + k] - n0

                        @pl.when((e >= 0) & (e < cfg.dcr))  # -1 slots give e < 0
                        def _():
                            dc_ref[pl.ds(e, 1), :] += g_ref[pl.ds(k, 1), :]
                        return c

                    lax.fori_loop(0, cfg.kc, scatter, 0)

            _tpu_sparse_walk(cfg, b, tks_ref, comp_hbm, buf, sem, process)

    if want_dq:
        @pl.when(j == nsteps - 1)
        def _():
            dq_ref[...] = dq_acc[...] * cfg.scale


def _tpu_dkey_kernel(cfg: AttnCfg, dense: bool, nsteps: int, *refs):
    q_ref, qseg_ref, do_ref, lse_ref, dt_ref, k_ref, kseg_ref, dk_ref, dk_acc = refs
    kb, j = pl.program_id(1), pl.program_id(2)
    R, cd = cfg.R, cfg.dtype
    if dense:
        ib = cfg.dense_qfirst(kb) + j
        ok = ib <= cfg.nq - 1
        mask_fn = lambda tq, qs: dense_mask(cfg, tq, qs, kb * cfg.bkc, kseg_ref[...])
    else:
        ib = cfg.dkv_qlo(kb) + j
        ok = ib <= cfg.dkv_qhi(kb)
        mask_fn = lambda tq, qs: window_mask(cfg, tq, qs, kb * cfg.bk, kseg_ref[...])

    @pl.when(j == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)

    @pl.when(ok)
    def _():
        q = cast(q_ref[...], cfg)
        k = cast(k_ref[...], cfg)
        do = do_ref[...]
        s = dot_nt(q, k) * cfg.scale
        mask = mask_fn(ib * cfg.bq + row_token(R, cfg.Hp), qseg_ref[...])
        p, ds = softmax_grads(q, do, lse_ref[...], dt_ref[...], s, mask, k, cd)
        dk_acc[...] += key_grad(p, ds, q, do, cfg.scale, cd)

    @pl.when(j == nsteps - 1)
    def _():
        dk_ref[...] = dk_acc[...]


def _tpu_common_specs(cfg: AttnCfg):
    """Index maps shared by the TPU forward and dq kernels (grid (B, nq, steps))."""
    from jax.experimental.pallas import tpu as pltpu

    R, cp = cfg.R, cfg.cp

    def kv_block(i, j):
        return jnp.minimum(cfg.win_lo(i) + jnp.minimum(j, cfg.nw - 1), cfg.win_hi(i))

    specs = dict(
        q=pl.BlockSpec((None, R, cp), lambda b, i, j: (b, i, 0)),
        col=pl.BlockSpec((None, R, 1), lambda b, i, j: (b, i, 0)),
        kv=pl.BlockSpec((None, cfg.bk, cp), lambda b, i, j: (b, kv_block(i, j), 0)),
        kseg=pl.BlockSpec((None, 1, cfg.bk), lambda b, i, j: (b, 0, kv_block(i, j))),
    )
    if cfg.mode == "dense":
        def c_block(i, j):
            return jnp.clip(j - cfg.nw, 0, jnp.maximum(cfg.n_vis_blocks(i) - 1, 0))

        specs["comp"] = pl.BlockSpec((None, cfg.bkc, cp), lambda b, i, j: (b, c_block(i, j), 0))
        specs["cseg"] = pl.BlockSpec((None, 1, cfg.bkc), lambda b, i, j: (b, 0, c_block(i, j)))
    elif cfg.mode == "topk":
        specs["tks"] = pl.BlockSpec((None, cfg.bq * cfg.Kp), lambda b, i, j: (b, i), memory_space=pltpu.SMEM)
        # rows (t, chunk) -> [kc] validity; a dynamic row index with static lanes (Mosaic rejects
        # dynamic unaligned lane offsets)
        specs["tkv"] = pl.BlockSpec((None, cfg.bq * cfg.nck, cfg.kc), lambda b, i, j: (b, i, 0))
        specs["comp"] = pl.BlockSpec(memory_space=pl.ANY)
    return specs


def _tpu_nsteps(cfg):
    return cfg.nw + (cfg.ncb if cfg.mode == "dense" else 1 if cfg.mode == "topk" else 0)


def _tpu_compiler_params(cfg, semantics, vmem_bytes=None):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_bytes)


def _vmem_estimate(*arrays):
    total = 0
    for shape, dtype in arrays:
        shape = list(shape)
        if len(shape) >= 1:
            shape[-1] = round_up(shape[-1], 128)
        if len(shape) >= 2:
            shape[-2] = round_up(shape[-2], 8)
        n = 1
        for d in shape:
            n *= d
        total += n * jnp.dtype(dtype).itemsize
    return total


def _tpu_vmem_limit(est):
    # headroom for Mosaic internal scratch; never below the 32 MiB most chips allow by default
    return int(min(max(2 * est + (8 << 20), 32 << 20), 100 << 20))


def tpu_fwd(cfg: AttnCfg, qr, qseg, sink_rows, kv, kseg, comp, aux):
    from jax.experimental.pallas import tpu as pltpu

    B, R, cp = cfg.B, cfg.R, cfg.cp
    sp = _tpu_common_specs(cfg)
    nsteps = _tpu_nsteps(cfg)
    in_specs = [sp["q"], sp["col"], pl.BlockSpec((R, 1), lambda b, i, j: (0, 0)), sp["kv"], sp["kseg"]]
    args = [qr, qseg, sink_rows, kv, kseg]
    scratch = [pltpu.VMEM((R, 1), F32), pltpu.VMEM((R, 1), F32), pltpu.VMEM((R, cp), F32)]
    if cfg.mode == "dense":
        in_specs += [sp["comp"], sp["cseg"]]
        args += [comp, aux]
    elif cfg.mode == "topk":
        tks, tkv = aux
        in_specs += [sp["tks"], sp["tkv"], sp["comp"]]
        args += [tks, tkv, comp]
        scratch += [pltpu.VMEM((2, cfg.kc, cp), comp.dtype), pltpu.SemaphoreType.DMA((2,))]
    est = _vmem_estimate(((2, R, cp), cfg.dtype), ((3, R, cp), F32), ((8, R, 1), F32), ((2, cfg.bk, cp), cfg.dtype),
                         ((2, max(cfg.bkc, cfg.kc), cp), F32), ((2, cfg.bq, cfg.Kp), jnp.int32))
    return pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, cfg, nsteps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(B, cfg.nq, nsteps), in_specs=in_specs,
            out_specs=[sp["q"], sp["col"]], scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct((B, cfg.Tp * cfg.Hp, cp), F32),
                   jax.ShapeDtypeStruct((B, cfg.Tp * cfg.Hp, 1), F32)],
        compiler_params=_tpu_compiler_params(cfg, ("parallel", "parallel", "arbitrary"), _tpu_vmem_limit(est)),
        interpret=cfg.backend.interpret_arg,
        name=f"v4_attn_fwd_{cfg.mode}",
    )(*args)


def tpu_bwd(cfg: AttnCfg, qr, qseg, kv, kseg, comp, aux, do, lse, dterm):
    from jax.experimental.pallas import tpu as pltpu

    B, R, cp = cfg.B, cfg.R, cfg.cp
    rows_total = cfg.Tp * cfg.Hp
    sp = _tpu_common_specs(cfg)
    nsteps = _tpu_nsteps(cfg)

    in_specs = [sp["q"], sp["col"], sp["kv"], sp["kseg"]]
    args = [qr, qseg, kv, kseg]
    if cfg.mode == "dense":
        in_specs += [sp["comp"], sp["cseg"]]
        args += [comp, aux]
    elif cfg.mode == "topk":
        tks, tkv = aux
        in_specs += [sp["tks"], sp["tkv"], sp["comp"]]
        args += [tks, tkv, comp]
    in_specs += [sp["q"], sp["col"], sp["col"]]
    args += [do, lse, dterm]
    est_base = _vmem_estimate(((2, R, cp), cfg.dtype), ((5, R, cp), F32), ((8, R, 1), F32),
                              ((2, cfg.bk, cp), cfg.dtype), ((2, max(cfg.bkc, cfg.kc), cp), F32))
    topk_scratch = []
    if cfg.mode == "topk":
        topk_scratch = [pltpu.VMEM((2, cfg.kc, cp), comp.dtype), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((cfg.kc, cp), F32)]

    def call(want_dq, want_dc, steps):
        out_specs, out_shape, scratch = [], [], []
        grid, semantics, specs = (B, cfg.nq, steps), ("parallel", "parallel", "arbitrary"), in_specs
        est = est_base
        if want_dq:
            out_specs.append(sp["q"])
            out_shape.append(jax.ShapeDtypeStruct((B, rows_total, cp), F32))
            scratch.append(pltpu.VMEM((R, cp), F32))
        if want_dc:
            def add_chunk_axis(spec):
                if spec.index_map is None:
                    return spec
                f = spec.index_map
                return pl.BlockSpec(spec.block_shape, lambda b, ch, i, j: f(b, i, j), memory_space=spec.memory_space)

            specs = [add_chunk_axis(s_) for s_ in in_specs]
            out_specs = [add_chunk_axis(s_) for s_ in out_specs]
            out_specs.append(pl.BlockSpec((None, cfg.dcr, cp), lambda b, ch, i, j: (b, ch, 0)))
            out_shape.append(jax.ShapeDtypeStruct((B, cfg.Np, cp), F32))
            grid = (B, cfg.nch, cfg.nq, steps)
            # a dcomp chunk accumulates over the q blocks: that axis is sequential
            semantics = ("parallel", "parallel", "arbitrary", "arbitrary")
            est += _vmem_estimate(((2, cfg.dcr, cp), F32), ((3, cfg.kc, cp), F32), ((2, cfg.bq, cfg.Kp), jnp.int32))
        return pl.pallas_call(
            functools.partial(_tpu_dq_kernel, cfg, steps, want_dq, want_dc),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=0, grid=grid, in_specs=specs, out_specs=out_specs,
                scratch_shapes=scratch + topk_scratch),
            out_shape=out_shape,
            compiler_params=_tpu_compiler_params(cfg, semantics, _tpu_vmem_limit(est)),
            interpret=cfg.backend.interpret_arg,
            name=f"v4_attn_{'dq' if want_dq else ''}{'dcomp' if want_dc else ''}_{cfg.mode}",
        )(*args)

    dcomp = None
    if cfg.mode != "topk":
        (dq,) = call(True, False, nsteps)
    elif cfg.nch == 1:  # one pass: dq and the whole dcomp resident
        dq, dcomp = call(True, True, nsteps)
    else:  # dcomp too big for VMEM: dq once, then one scatter pass per dcomp chunk
        (dq,) = call(True, False, nsteps)
        (dcomp,) = call(False, True, 1)

    # ---- key-side gradients: grid (B, key_blocks, q_steps)
    def dkey(dense, keys, segs, nblk, blk, nsteps_k, q_block):
        qspec = pl.BlockSpec((None, R, cp), lambda b, kb, j: (b, q_block(kb, j), 0))
        cspec = pl.BlockSpec((None, R, 1), lambda b, kb, j: (b, q_block(kb, j), 0))
        est_k = _vmem_estimate(((2, R, cp), cfg.dtype), ((2, R, cp), F32), ((6, R, 1), F32),
                               ((2, blk, cp), cfg.dtype), ((3, blk, cp), F32))
        return pl.pallas_call(
            functools.partial(_tpu_dkey_kernel, cfg, dense, nsteps_k),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=0, grid=(B, nblk, nsteps_k),
                in_specs=[qspec, cspec, qspec, cspec, cspec,
                          pl.BlockSpec((None, blk, cp), lambda b, kb, j: (b, kb, 0)),
                          pl.BlockSpec((None, 1, blk), lambda b, kb, j: (b, 0, kb))],
                out_specs=pl.BlockSpec((None, blk, cp), lambda b, kb, j: (b, kb, 0)),
                scratch_shapes=[pltpu.VMEM((blk, cp), F32)]),
            out_shape=jax.ShapeDtypeStruct((B, nblk * blk, cp), F32),
            compiler_params=_tpu_compiler_params(cfg, ("parallel", "parallel", "arbitrary"), _tpu_vmem_limit(est_k)),
            interpret=cfg.backend.interpret_arg,
            name=f"v4_attn_d{'comp' if dense else 'kv'}",
        )(qr, qseg, do, lse, dterm, keys, segs)

    dkv = dkey(False, kv, kseg, cfg.nkb, cfg.bk, cfg.nqw,
               lambda kb, j: jnp.minimum(cfg.dkv_qlo(kb) + j, cfg.dkv_qhi(kb)))
    if cfg.mode == "dense":
        dcomp = dkey(True, comp, aux, cfg.ncb, cfg.bkc, cfg.nq,
                     lambda kb, j: jnp.minimum(cfg.dense_qfirst(kb) + j, cfg.nq - 1))
    return dq, dkv, dcomp
