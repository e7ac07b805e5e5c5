"""Shared implementation of the two attention kernels (CSA top-k and HCA/dense/window-only).

One online-softmax pass over ``[window keys | compressed keys | sink]`` with the single shared
K=V head, fp32 accumulation. Three key-set modes (static):

* ``"window"``: sliding window only (W layers, or no compressed entries yet).
* ``"dense"``:  window + every visible compressed entry (``e < (t+1)//ratio``, same segment).
* ``"topk"``:   window + the compressed entries listed per query (``-1`` = empty slot).

Two wrappers around the same block math (``_common``):

* TPU (Mosaic): grid ``(B, q_blocks, steps)``; window / dense-compressed key blocks arrive through
  BlockSpec pipelining (index maps clamp to the blocks a query block needs, so nothing else is
  fetched); m/l/acc live in VMEM scratch. Top-k: the index block of the current query block is
  streamed into SMEM (addresses) and VMEM (validity mask), and ONLY the selected compressed rows
  are fetched, with double-buffered per-row DMAs from HBM. The backward scatter-adds the top-k
  gradient rows into a VMEM-resident ``dcomp`` (row read-modify-write, sequential over q blocks).
* Portable (Triton on GPU; the generic interpreter on CPU): grid ``(B, q_blocks)``, one program per
  block, loops inside over key blocks (``pl.ds`` slices of the whole per-batch arrays); top-k rows
  are a vector gather ``comp_ref[idx]``; the backward scatter uses ``atomic_add`` into a
  zero-initialised aliased buffer.

Backward: ``dq`` kernel (same key walk as the forward; for top-k it also emits the per-selection
key gradients and scatter-adds them into ``dcomp``), window ``dkv`` kernel (per key block, over
the query blocks whose window covers it), dense ``dcomp`` kernel (per entry block, over the later
query blocks). ``dsink`` and ``delta`` are cheap jnp reductions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._common import (
    Backend, align_dim, cdiv, idiv, imod, dot_nn, dot_nt, key_grad, lcm, next_pow2, online_update, pad_axis,
    resolve_backend, round_up, row_token, softmax_grads,
)

F32 = jnp.float32


# ============================================================================= static config

@dataclasses.dataclass(frozen=True)
class AttnCfg:
    mode: str          # "window" | "dense" | "topk"
    window: int
    ratio: int
    scale: float
    B: int
    H: int
    Hp: int            # padded heads
    c: int
    cp: int            # padded channels
    T: int
    Tp: int            # padded query tokens (multiple of bq)
    Tk: int            # padded kv rows (multiple of bk, >= Tp)
    N: int             # real compressed entries
    Np: int            # padded entries (topk portable: row N is a zero dummy for -1 slots)
    K: int
    Kp: int
    bq: int            # query tokens per block
    bk: int            # kv rows per window block
    bkc: int           # compressed rows per dense block
    kc: int            # top-k chunk (entries per token per step)
    dcr: int           # TPU top-k backward: dcomp rows kept resident in VMEM per pass (Np % dcr == 0)
    cd: str            # matmul operand dtype name
    backend: Backend

    # ---- derived sizes
    @property
    def R(self):
        return self.bq * self.Hp

    @property
    def nq(self):
        return self.Tp // self.bq

    @property
    def nkb(self):
        return self.Tk // self.bk

    @property
    def ncb(self):
        return self.Np // self.bkc

    @property
    def nck(self):
        return self.Kp // self.kc

    @property
    def dtype(self):
        return jnp.dtype(self.cd)

    @property
    def nch(self):
        return self.Np // self.dcr if self.mode == "topk" else 1

    # ---- window ranges (work on python ints and traced int32 scalars alike)
    def win_lo(self, i):
        return idiv(jnp.maximum(i * self.bq - self.window + 1, 0), self.bk)

    def win_hi(self, i):
        return idiv((i + 1) * self.bq - 1, self.bk)

    @property
    def nw(self):
        return max((((i + 1) * self.bq - 1) // self.bk) - (max(i * self.bq - self.window + 1, 0) // self.bk) + 1
                   for i in range(self.nq))

    def dkv_qlo(self, kb):
        return idiv(kb * self.bk, self.bq)

    def dkv_qhi(self, kb):
        return jnp.minimum(idiv(kb * self.bk + self.bk + self.window - 2, self.bq), self.nq - 1)

    @property
    def nqw(self):
        return max(min((kb * self.bk + self.bk + self.window - 2) // self.bq, self.nq - 1)
                   - (kb * self.bk) // self.bq + 1 for kb in range(self.nkb))

    # ---- dense compressed ranges
    def n_vis_blocks(self, i):
        nvis = jnp.minimum(idiv((i + 1) * self.bq, self.ratio), self.N)
        return idiv(nvis + self.bkc - 1, self.bkc)

    def dense_qfirst(self, cb):
        return jnp.minimum(idiv((cb * self.bkc + 1) * self.ratio - 1, self.bq), self.nq)


def _window_mask(cfg: AttnCfg, tq, qseg, kstart, kseg):
    """tq, qseg ``[R, 1]``; kseg ``[1, bk]`` -> ``[R, bk]``: ``0 <= t - s < window``, same segment."""
    kpos = kstart + lax.broadcasted_iota(jnp.int32, (1, cfg.bk), 1)
    d = tq - kpos
    return (d >= 0) & (d < cfg.window) & (qseg == kseg)


def _dense_mask(cfg: AttnCfg, tq, qseg, cstart, cseg):
    """Entry e visible to token t iff ``e < (t+1)//ratio`` (i.e. ``e*ratio + ratio-1 <= t``),
    ``e < N`` and same segment."""
    e = cstart + lax.broadcasted_iota(jnp.int32, (1, cfg.bkc), 1)
    return (e * cfg.ratio + (cfg.ratio - 1) <= tq) & (e < cfg.N) & (qseg == cseg)


def _cast(x, cfg):
    return x.astype(cfg.dtype)


# ============================================================================= portable kernels
# grid (B, nq) [fwd, dq] or (B, key_blocks) [dkv, dcomp]; whole per-batch arrays as blocks.

def _portable_fwd_kernel(cfg: AttnCfg, *refs):
    if cfg.mode == "window":
        q_ref, qseg_ref, sink_ref, kv_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, qseg_ref, sink_ref, kv_ref, kseg_ref, comp_ref, aux_ref, o_ref, lse_ref = refs
    i = pl.program_id(1)
    R, cd = cfg.R, cfg.dtype
    q = _cast(q_ref[...], cfg)
    qseg = qseg_ref[...]
    tq_local = row_token(R, cfg.Hp)
    tq = i * cfg.bq + tq_local
    m = sink_ref[...].astype(F32)
    l = jnp.ones((R, 1), F32)
    acc = jnp.zeros((R, cfg.cp), F32)

    def win(kb, carry):
        start = pl.multiple_of(kb * cfg.bk, cfg.bk)
        k = kv_ref[pl.ds(start, cfg.bk), :]
        s = dot_nt(q, _cast(k, cfg)) * cfg.scale
        mask = _window_mask(cfg, tq, qseg, start, kseg_ref[:, pl.ds(start, cfg.bk)])
        return online_update(*carry, s, mask, k, cd)

    carry = lax.fori_loop(cfg.win_lo(i), cfg.win_hi(i) + 1, win, (m, l, acc))

    if cfg.mode == "dense":
        def dense(cb, carry):
            start = pl.multiple_of(cb * cfg.bkc, cfg.bkc)
            k = comp_ref[pl.ds(start, cfg.bkc), :]
            s = dot_nt(q, _cast(k, cfg)) * cfg.scale
            mask = _dense_mask(cfg, tq, qseg, start, aux_ref[:, pl.ds(start, cfg.bkc)])
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
            s = dot_nt(q, _cast(rows, cfg)) * cfg.scale
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
    q = _cast(q_ref[...], cfg)
    do = do_ref[...]
    lse = lse_ref[...]
    dterm = dt_ref[...]
    qseg = qseg_ref[...]
    tq_local = row_token(R, cfg.Hp)
    tq = i * cfg.bq + tq_local

    def win(kb, dq):
        start = pl.multiple_of(kb * cfg.bk, cfg.bk)
        k = _cast(kv_ref[pl.ds(start, cfg.bk), :], cfg)
        s = dot_nt(q, k) * cfg.scale
        mask = _window_mask(cfg, tq, qseg, start, kseg_ref[:, pl.ds(start, cfg.bk)])
        _, ds = softmax_grads(q, do, lse, dterm, s, mask, k, cd)
        return dq + dot_nn(ds.astype(cd), k)

    dq = lax.fori_loop(cfg.win_lo(i), cfg.win_hi(i) + 1, win, jnp.zeros((R, cfg.cp), F32))

    if cfg.mode == "dense":
        def dense(cb, dq):
            start = pl.multiple_of(cb * cfg.bkc, cfg.bkc)
            k = _cast(comp_ref[pl.ds(start, cfg.bkc), :], cfg)
            s = dot_nt(q, k) * cfg.scale
            mask = _dense_mask(cfg, tq, qseg, start, aux_ref[:, pl.ds(start, cfg.bkc)])
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
            rows = _cast(comp_ref[idxc, :], cfg)
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
    k = _cast(k_ref[...], cfg)
    kseg = kseg_ref[...]
    tq_local = row_token(R, cfg.Hp)
    if dense:
        start = j * cfg.bkc
        lo, hi = cfg.dense_qfirst(j), cfg.nq - 1
        mask_fn = lambda tq, qseg: _dense_mask(cfg, tq, qseg, start, kseg)
    else:
        start = j * cfg.bk
        lo, hi = cfg.dkv_qlo(j), cfg.dkv_qhi(j)
        mask_fn = lambda tq, qseg: _window_mask(cfg, tq, qseg, start, kseg)

    def body(ib, dk):
        r0 = pl.multiple_of(ib * R, R)
        q = _cast(q_ref[pl.ds(r0, R), :], cfg)
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


def _portable_fwd(cfg: AttnCfg, qr, qseg, sink_rows, kv, kseg, comp, aux):
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


def _portable_bwd(cfg: AttnCfg, qr, qseg, kv, kseg, comp, aux, do, lse, dterm):
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


# ============================================================================= TPU kernels
# grid (B, nq, steps): steps walk the window kv blocks, then the dense compressed blocks, or one
# extra step for the top-k gather. Scratch accumulators; index maps clamp to needed blocks.

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
        q = _cast(q_ref[...], cfg)
        tq = i * cfg.bq + row_token(R, Hp)
        s = dot_nt(q, _cast(k, cfg)) * cfg.scale
        m, l, acc = online_update(m_ref[...], l_ref[...], acc_ref[...], s, mask_fn(tq, qseg_ref[...]), k, cd)
        m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

    kb = cfg.win_lo(i) + j

    @pl.when((j < cfg.nw) & (kb <= cfg.win_hi(i)))
    def _():
        update(kv_ref[...], lambda tq, qs: _window_mask(cfg, tq, qs, kb * cfg.bk, kseg_ref[...]))

    if cfg.mode == "dense":
        cb = j - cfg.nw

        @pl.when((j >= cfg.nw) & (cb < cfg.n_vis_blocks(i)))
        def _():
            update(comp_ref[...], lambda tq, qs: _dense_mask(cfg, tq, qs, cb * cfg.bkc, cseg_ref[...]))

    elif cfg.mode == "topk":
        @pl.when(j == cfg.nw)
        def _():
            def process(tt, kk, slot):
                r0 = pl.multiple_of(tt * Hp, Hp)
                rows = buf[slot]
                qt = _cast(q_ref[pl.ds(r0, Hp), :], cfg)
                s = dot_nt(qt, _cast(rows, cfg)) * cfg.scale
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
        q = _cast(q_ref[...], cfg)
        k = _cast(k, cfg)
        tq = i * cfg.bq + row_token(R, Hp)
        s = dot_nt(q, k) * cfg.scale
        _, ds = softmax_grads(q, do_ref[...], lse_ref[...], dt_ref[...], s, mask_fn(tq, qseg_ref[...]), k, cd)
        dq_acc[...] += dot_nn(ds.astype(cd), k)

    sparse_step = cfg.nw if want_dq else 0
    if want_dq:
        kb = cfg.win_lo(i) + j

        @pl.when((j < cfg.nw) & (kb <= cfg.win_hi(i)))
        def _():
            update(kv_ref[...], lambda tq, qs: _window_mask(cfg, tq, qs, kb * cfg.bk, kseg_ref[...]))

        if cfg.mode == "dense":
            cb = j - cfg.nw

            @pl.when((j >= cfg.nw) & (cb < cfg.n_vis_blocks(i)))
            def _():
                update(comp_ref[...], lambda tq, qs: _dense_mask(cfg, tq, qs, cb * cfg.bkc, cseg_ref[...]))

    if cfg.mode == "topk":
        @pl.when(j == sparse_step)
        def _():
            def process(tt, kk, slot):
                r0 = pl.multiple_of(tt * Hp, Hp)
                rows = _cast(buf[slot], cfg)
                qt = _cast(q_ref[pl.ds(r0, Hp), :], cfg)
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
        mask_fn = lambda tq, qs: _dense_mask(cfg, tq, qs, kb * cfg.bkc, kseg_ref[...])
    else:
        ib = cfg.dkv_qlo(kb) + j
        ok = ib <= cfg.dkv_qhi(kb)
        mask_fn = lambda tq, qs: _window_mask(cfg, tq, qs, kb * cfg.bk, kseg_ref[...])

    @pl.when(j == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)

    @pl.when(ok)
    def _():
        q = _cast(q_ref[...], cfg)
        k = _cast(k_ref[...], cfg)
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


def _tpu_fwd(cfg: AttnCfg, qr, qseg, sink_rows, kv, kseg, comp, aux):
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


def _tpu_bwd(cfg: AttnCfg, qr, qseg, kv, kseg, comp, aux, do, lse, dterm):
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


# ============================================================================= custom_vjp core

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, qr, kv, sink_rows, comp, aux, qseg, kseg):
    return _fwd_impl(cfg, qr, kv, sink_rows, comp, aux, qseg, kseg)


def _fwd_impl(cfg, qr, kv, sink_rows, comp, aux, qseg, kseg):
    fwd = _tpu_fwd if cfg.backend.kind == "tpu" else _portable_fwd
    o, lse = fwd(cfg, qr, qseg, sink_rows, kv, kseg, comp, aux)
    return o, lse


def _core_fwd(cfg, qr, kv, sink_rows, comp, aux, qseg, kseg):
    o, lse = _fwd_impl(cfg, qr, kv, sink_rows, comp, aux, qseg, kseg)
    return (o, lse), (qr, kv, sink_rows, comp, aux, qseg, kseg, o, lse)


def _core_bwd(cfg, res, cts):
    qr, kv, sink_rows, comp, aux, qseg, kseg, o, lse = res
    do, glse = cts
    do = do.astype(F32)
    glse = glse.astype(F32)
    delta = jnp.sum(o * do, axis=-1, keepdims=True)
    dterm = delta - glse
    bwd = _tpu_bwd if cfg.backend.kind == "tpu" else _portable_bwd
    dq, dkv, dcomp = bwd(cfg, qr, qseg, kv, kseg, comp, aux, do, lse, dterm)
    # sink: d out / d z' = -p' out, d lse / d z' = p'  ->  dz' = p' (g_lse - delta)
    B = qr.shape[0]
    p_sink = jnp.exp(sink_rows[None, None] - lse.reshape(B, cfg.nq, cfg.R, 1))
    dsink = jnp.sum(p_sink * (-dterm.reshape(B, cfg.nq, cfg.R, 1)), axis=(0, 1))
    dcomp_out = None if comp is None else dcomp.astype(comp.dtype)
    return (dq.astype(qr.dtype), dkv.astype(kv.dtype), dsink.astype(sink_rows.dtype), dcomp_out,
            None, None, None)


_core.defvjp(_core_fwd, _core_bwd)


# ============================================================================= public entry

def _tpu_resident_rows(cp: int) -> int:
    """Rows of the f32 top-k ``dcomp`` accumulator kept in VMEM per backward pass (double-buffered
    output block): ~40 MiB on 128 MiB-VMEM chips (v5e, v6e, v5p), ~5 MiB on older ones."""
    kind = jax.devices()[0].device_kind.lower() if jax.default_backend() == "tpu" else ""
    budget = (5 << 20) if any(v in kind for v in ("v2", "v3", "v4")) else (40 << 20)
    return max(8, (budget // (2 * cp * 4)) // 8 * 8)


def _defaults(be: Backend, Hp: int):
    if be.kind == "tpu":
        return dict(block_q=max(8, round_up(max(1, 512 // Hp), 8)), block_k=128, block_c=128, chunk_k=128)
    if be.gpu and not be.interpret:
        return dict(block_q=max(1, 64 // Hp), block_k=64, block_c=64, chunk_k=64)
    return dict(block_q=max(8, 64 // max(Hp, 1)), block_k=32, block_c=32, chunk_k=32)


def attention(q, kv, sink, comp, topk, *, mode, window, ratio=1, scale=None, segment_ids=None,
              comp_segment_ids=None, block_q=None, block_k=None, block_c=None, chunk_k=None,
              comp_chunk_rows=None, backend=None, interpret=None):
    """Shared entry. Returns ``(out [B,T,H,c] f32, lse [B,T,H] f32)``."""
    B, T, H, c = q.shape
    if kv.shape != (B, T, c):
        raise ValueError(f"kv must be [B, T, c] = {(B, T, c)}, got {kv.shape}")
    be = resolve_backend(backend, interpret)
    scale = float(c ** -0.5 if scale is None else scale)
    N = 0 if comp is None else comp.shape[1]
    K = 0 if topk is None else topk.shape[-1]
    if mode == "topk" and (N == 0 or K == 0):
        mode = "window"
    if mode == "dense" and N == 0:
        mode = "window"
    dtypes = [q.dtype, kv.dtype] + ([comp.dtype] if mode != "window" else [])
    cd = jnp.result_type(*dtypes)
    if not jnp.issubdtype(cd, jnp.floating):
        raise TypeError(f"floating inputs expected, got {cd}")

    # ---- per-backend alignment
    if be.kind == "tpu":
        h_align = 16 if jnp.dtype(cd).itemsize < 4 else 8
        Hp, cp = align_dim(H, h_align), align_dim(c, 128)
    elif be.gpu and not be.interpret:
        Hp, cp = next_pow2(H), max(16, next_pow2(c))
    else:
        Hp, cp = H, c
    d = _defaults(be, Hp)
    bq = block_q or d["block_q"]
    bk = block_k or d["block_k"]
    bkc = block_c or d["block_c"]
    kc = chunk_k or d["chunk_k"]
    if be.kind == "tpu":
        bq = round_up(bq, 8)
        bk, bkc, kc = round_up(bk, 128), round_up(bkc, 128), round_up(kc, 128)
    elif be.gpu and not be.interpret:
        bq = next_pow2(bq)
        bq = max(bq, next_pow2(cdiv(16, Hp)))  # tl.dot needs M >= 16
        bk, bkc, kc = max(16, next_pow2(bk)), max(16, next_pow2(bkc)), max(16, next_pow2(kc))
    if mode == "topk" and be.kind != "tpu":
        kc = min(kc, K) if not (be.gpu and not be.interpret) else min(kc, max(16, next_pow2(K)))
    Tp = round_up(T, lcm(bq, bk) if be.kind == "tpu" else bq)
    Tk = round_up(Tp, bk)
    if mode == "dense":
        Np = round_up(N, bkc)
    elif mode == "topk":
        Np = round_up(N, 8) if be.kind == "tpu" else N + 1
        if be.kind == "tpu":
            dcr = round_up(min(comp_chunk_rows or _tpu_resident_rows(cp), Np), 8)
            Np = round_up(Np, dcr)
    else:
        Np = 0
    Kp = round_up(K, kc) if mode == "topk" else 0
    if not (mode == "topk" and be.kind == "tpu"):
        dcr = max(Np, 1)
    cfg = AttnCfg(mode=mode, window=int(window), ratio=int(ratio), scale=scale, B=B, H=H, Hp=Hp, c=c, cp=cp,
                  T=T, Tp=Tp, Tk=Tk, N=N, Np=Np, K=K, Kp=Kp, bq=bq, bk=bk, bkc=bkc, kc=kc, dcr=dcr,
                  cd=jnp.dtype(cd).name, backend=be)

    # ---- layouts
    qp = pad_axis(pad_axis(pad_axis(q.astype(cd), 1, Tp), 2, Hp), 3, cp)
    qr = qp.reshape(B, Tp * Hp, cp)
    kvp = pad_axis(pad_axis(kv.astype(cd), 1, Tk), 2, cp)
    sink_rows = jnp.tile(pad_axis(sink.astype(F32), 0, Hp), bq)[:, None]
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    qseg = jnp.broadcast_to(pad_axis(seg, 1, Tp, -1)[:, :, None], (B, Tp, Hp)).reshape(B, Tp * Hp, 1)
    kseg = pad_axis(seg, 1, Tk, -2)[:, None, :]
    compp, aux = None, None
    if mode == "dense":
        compp = pad_axis(pad_axis(comp.astype(cd), 1, Np), 2, cp)
        if comp_segment_ids is None:
            cseg = jnp.zeros((B, N), jnp.int32) if segment_ids is None else None
            if cseg is None:
                raise ValueError("comp_segment_ids is required when segment_ids is given")
        else:
            cseg = comp_segment_ids.astype(jnp.int32)
        aux = pad_axis(cseg, 1, Np, -3)[:, None, :]
    elif mode == "topk":
        comp_dt = F32 if be.kind == "tpu" else cd  # TPU: single-row DMAs need 32-bit rows
        compp = pad_axis(pad_axis(comp.astype(comp_dt), 1, Np), 2, cp)
        tk = pad_axis(pad_axis(topk.astype(jnp.int32), 1, Tp, -1), 2, Kp, -1)
        if be.kind == "tpu":
            aux = (tk.reshape(B, Tp * Kp), tk.reshape(B, Tp * (Kp // kc), kc))
        else:  # [B, nq, nck, bq*kc], token-major within a chunk
            nq, nck = Tp // bq, Kp // kc
            aux = tk.reshape(B, nq, bq, nck, kc).transpose(0, 1, 3, 2, 4).reshape(B, nq, nck, bq * kc)
    o, lse = _core(cfg, qr, kvp, sink_rows, compp, aux, qseg, kseg)
    o = o.reshape(B, Tp, Hp, cp)[:, :T, :H, :c]
    lse = lse.reshape(B, Tp, Hp)[:, :T, :H]
    return o, lse
