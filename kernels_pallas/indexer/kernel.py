"""Lightning-indexer scores (spec 3.4) as a Pallas kernel, with a custom_vjp backward.

``scores[b,t,n] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,n])``, ``-inf`` where entry n is not
visible to query t (``n < (t+1)//ratio`` and same segment).

Row layout as in the attention kernels: q ``[B, T*nI, cI]`` (row = t*nI + h), so the nI heads are
the M dimension of the ``q @ k^T`` tile; the weighted head sum is a second small matmul with the
block-diagonal one-hot ``E^T [bt, bt*nI]`` (``E[r, t] = (r // nI == t)``), which lowers on Mosaic
and Triton alike (no 3-D reshapes). Tiles whose entries are all invisible are filled with -inf
without computing.

Forward: grid ``(B, T/bt, N/bn)``, one output tile per program, the same body on every backend.
Backward: ``dq, dw`` (grid over query blocks, walking the visible entry blocks) and ``dk`` (grid
over entry blocks, walking the later query blocks). TPU: the walk is a pipelined grid axis with
VMEM scratch accumulators; portable (Triton / interpreter): a ``fori_loop`` over ``pl.ds`` slices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._common import (
    Backend, align_dim, dot_nn, dot_nt, dot_tn, idiv, next_pow2, pad_axis, resolve_backend, round_up, row_token,
)

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class IdxCfg:
    ratio: int
    B: int
    T: int
    Tp: int
    nI: int
    nIp: int
    cI: int
    cIp: int
    N: int
    Np: int
    bt: int
    bn: int
    cd: str
    backend: Backend

    @property
    def R(self):
        return self.bt * self.nIp

    @property
    def nt(self):
        return self.Tp // self.bt

    @property
    def nn(self):
        return self.Np // self.bn

    @property
    def dtype(self):
        return jnp.dtype(self.cd)

    def n_vis_blocks(self, i):
        """Entry blocks with at least one entry visible to query block i."""
        nvis = jnp.minimum(idiv((i + 1) * self.bt, self.ratio), self.N)
        return idiv(nvis + self.bn - 1, self.bn)

    def qfirst(self, j):
        """First query block that sees an entry of block j."""
        return jnp.minimum(idiv((j * self.bn + 1) * self.ratio - 1, self.bt), self.nt)


def _tile_mask(cfg: IdxCfg, i, j, qseg, kseg):
    """``[bt, bn]`` visibility of entries ``j*bn + .`` to tokens ``i*bt + .``."""
    tq = i * cfg.bt + lax.broadcasted_iota(jnp.int32, (cfg.bt, 1), 0)
    e = j * cfg.bn + lax.broadcasted_iota(jnp.int32, (1, cfg.bn), 1)
    return (e * cfg.ratio + (cfg.ratio - 1) <= tq) & (e < cfg.N) & (qseg == kseg)


def _onehot_rows(cfg: IdxCfg, transpose: bool):
    """``E [R, bt]`` (row r belongs to token r // nI), or ``E^T [bt, R]``; f32."""
    if transpose:
        tok = row_token(cfg.R, cfg.nIp, axis=1)
        return (tok == lax.broadcasted_iota(jnp.int32, (cfg.bt, 1), 0)).astype(F32)
    tok = row_token(cfg.R, cfg.nIp, axis=0)
    return (tok == lax.broadcasted_iota(jnp.int32, (1, cfg.bt), 1)).astype(F32)


def _tile_grads(cfg: IdxCfg, q, w, k, g):
    """q ``[R, cI]``, w ``[R, 1]``, k ``[bn, cI]``, g ``[bt, bn]`` (already masked) ->
    ``(ds [R, bn], dw [R, 1])`` with ``ds = E g * w * 1[s > 0]``."""
    s = dot_nt(q, k)
    gr = dot_nn(_onehot_rows(cfg, False), g)  # [R, bn]: g of each row's token
    dw = jnp.sum(gr * jnp.maximum(s, 0.0), axis=1, keepdims=True)
    ds = jnp.where(s > 0, gr * w, 0.0)
    return ds, dw


# ============================================================================= forward (all backends)

def _fwd_kernel(cfg: IdxCfg, q_ref, w_ref, k_ref, qseg_ref, kseg_ref, o_ref):
    i, j = pl.program_id(1), pl.program_id(2)
    needed = j * cfg.bn * cfg.ratio + (cfg.ratio - 1) <= (i + 1) * cfg.bt - 1

    @pl.when(needed)
    def _():
        q = q_ref[...].astype(cfg.dtype)
        k = k_ref[...].astype(cfg.dtype)
        a = jnp.maximum(dot_nt(q, k), 0.0) * w_ref[...]  # [R, bn]
        sc = dot_nn(_onehot_rows(cfg, True), a)  # [bt, bn]
        o_ref[...] = jnp.where(_tile_mask(cfg, i, j, qseg_ref[...], kseg_ref[...]), sc, -jnp.inf)

    @pl.when(jnp.logical_not(needed))
    def _():
        o_ref[...] = jnp.full((cfg.bt, cfg.bn), -jnp.inf, F32)


def _compiler_params(cfg: IdxCfg, semantics):
    if cfg.backend.kind == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))
    if cfg.backend.gpu and not cfg.backend.interpret:
        from jax.experimental.pallas import triton as pltriton
        return dict(compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))
    return {}


def _clamp_block(cfg: IdxCfg, i, j):
    """Entry block to fetch at step j of query block i: blocks past the visible ones repeat the
    last visible block, so the pipeline skips their DMA."""
    return jnp.minimum(j, jnp.maximum(cfg.n_vis_blocks(i) - 1, 0))


def _fwd(cfg: IdxCfg, qr, wr, keys, qseg, kseg):
    R, bt, bn = cfg.R, cfg.bt, cfg.bn
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg),
        grid=(cfg.B, cfg.nt, cfg.nn),
        in_specs=[pl.BlockSpec((None, R, cfg.cIp), lambda b, i, j: (b, i, 0)),
                  pl.BlockSpec((None, R, 1), lambda b, i, j: (b, i, 0)),
                  pl.BlockSpec((None, bn, cfg.cIp), lambda b, i, j: (b, _clamp_block(cfg, i, j), 0)),
                  pl.BlockSpec((None, bt, 1), lambda b, i, j: (b, i, 0)),
                  pl.BlockSpec((None, 1, bn), lambda b, i, j: (b, 0, j))],
        out_specs=pl.BlockSpec((None, bt, bn), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((cfg.B, cfg.Tp, cfg.Np), F32),
        interpret=cfg.backend.interpret_arg,
        name="v4_indexer_fwd",
        **_compiler_params(cfg, ("parallel", "parallel", "parallel")),
    )(qr, wr, keys, qseg, kseg)


# ============================================================================= backward, portable

def _portable_dq_kernel(cfg: IdxCfg, q_ref, w_ref, k_ref, qseg_ref, kseg_ref, g_ref, dq_ref, dw_ref):
    i = pl.program_id(1)
    q = q_ref[...].astype(cfg.dtype)
    w = w_ref[...]
    qseg = qseg_ref[...]

    def body(j, carry):
        dq, dw = carry
        n0 = pl.multiple_of(j * cfg.bn, cfg.bn)
        k = k_ref[pl.ds(n0, cfg.bn), :].astype(cfg.dtype)
        g = jnp.where(_tile_mask(cfg, i, j, qseg, kseg_ref[:, pl.ds(n0, cfg.bn)]), g_ref[:, pl.ds(n0, cfg.bn)], 0.0)
        ds, dw_t = _tile_grads(cfg, q, w, k, g)
        return dq + dot_nn(ds.astype(cfg.dtype), k), dw + dw_t

    dq, dw = lax.fori_loop(0, cfg.n_vis_blocks(i), body,
                           (jnp.zeros((cfg.R, cfg.cIp), F32), jnp.zeros((cfg.R, 1), F32)))
    dq_ref[...] = dq
    dw_ref[...] = dw


def _portable_dk_kernel(cfg: IdxCfg, q_ref, w_ref, k_ref, qseg_ref, kseg_ref, g_ref, dk_ref):
    j = pl.program_id(1)
    k = k_ref[...].astype(cfg.dtype)
    kseg = kseg_ref[...]

    def body(i, dk):
        r0 = pl.multiple_of(i * cfg.R, cfg.R)
        t0 = pl.multiple_of(i * cfg.bt, cfg.bt)
        q = q_ref[pl.ds(r0, cfg.R), :].astype(cfg.dtype)
        g = jnp.where(_tile_mask(cfg, i, j, qseg_ref[pl.ds(t0, cfg.bt), :], kseg), g_ref[pl.ds(t0, cfg.bt), :], 0.0)
        ds, _ = _tile_grads(cfg, q, w_ref[pl.ds(r0, cfg.R), :], k, g)
        return dk + dot_tn(ds.astype(cfg.dtype), q)

    dk_ref[...] = lax.fori_loop(cfg.qfirst(j), cfg.nt, body, jnp.zeros((cfg.bn, cfg.cIp), F32))


def _portable_bwd(cfg: IdxCfg, qr, wr, keys, qseg, kseg, g):
    B, R, bt, bn = cfg.B, cfg.R, cfg.bt, cfg.bn
    rows = cfg.Tp * cfg.nIp
    per_b = lambda *shape: pl.BlockSpec((None, *shape), lambda b, x: (b,) + (0,) * len(shape))
    dq, dw = pl.pallas_call(
        functools.partial(_portable_dq_kernel, cfg),
        grid=(B, cfg.nt),
        in_specs=[pl.BlockSpec((None, R, cfg.cIp), lambda b, i: (b, i, 0)),
                  pl.BlockSpec((None, R, 1), lambda b, i: (b, i, 0)),
                  per_b(cfg.Np, cfg.cIp),
                  pl.BlockSpec((None, bt, 1), lambda b, i: (b, i, 0)),
                  per_b(1, cfg.Np),
                  pl.BlockSpec((None, bt, cfg.Np), lambda b, i: (b, i, 0))],
        out_specs=[pl.BlockSpec((None, R, cfg.cIp), lambda b, i: (b, i, 0)),
                   pl.BlockSpec((None, R, 1), lambda b, i: (b, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, rows, cfg.cIp), F32), jax.ShapeDtypeStruct((B, rows, 1), F32)],
        interpret=cfg.backend.interpret_arg,
        name="v4_indexer_dq",
        **_compiler_params(cfg, None),
    )(qr, wr, keys, qseg, kseg, g)
    dk = pl.pallas_call(
        functools.partial(_portable_dk_kernel, cfg),
        grid=(B, cfg.nn),
        in_specs=[per_b(rows, cfg.cIp), per_b(rows, 1),
                  pl.BlockSpec((None, bn, cfg.cIp), lambda b, j: (b, j, 0)),
                  per_b(cfg.Tp, 1),
                  pl.BlockSpec((None, 1, bn), lambda b, j: (b, 0, j)),
                  pl.BlockSpec((None, cfg.Tp, bn), lambda b, j: (b, 0, j))],
        out_specs=pl.BlockSpec((None, bn, cfg.cIp), lambda b, j: (b, j, 0)),
        out_shape=jax.ShapeDtypeStruct((B, cfg.Np, cfg.cIp), F32),
        interpret=cfg.backend.interpret_arg,
        name="v4_indexer_dk",
        **_compiler_params(cfg, None),
    )(qr, wr, keys, qseg, kseg, g)
    return dq, dk, dw


# ============================================================================= backward, TPU

def _tpu_dq_kernel(cfg: IdxCfg, q_ref, w_ref, k_ref, qseg_ref, kseg_ref, g_ref, dq_ref, dw_ref, dq_acc, dw_acc):
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        dq_acc[...] = jnp.zeros(dq_acc.shape, F32)
        dw_acc[...] = jnp.zeros(dw_acc.shape, F32)

    @pl.when(j < cfg.n_vis_blocks(i))
    def _():
        q = q_ref[...].astype(cfg.dtype)
        k = k_ref[...].astype(cfg.dtype)
        g = jnp.where(_tile_mask(cfg, i, j, qseg_ref[...], kseg_ref[...]), g_ref[...], 0.0)
        ds, dw = _tile_grads(cfg, q, w_ref[...], k, g)
        dq_acc[...] += dot_nn(ds.astype(cfg.dtype), k)
        dw_acc[...] += dw

    @pl.when(j == cfg.nn - 1)
    def _():
        dq_ref[...] = dq_acc[...]
        dw_ref[...] = dw_acc[...]


def _tpu_dk_kernel(cfg: IdxCfg, q_ref, w_ref, k_ref, qseg_ref, kseg_ref, g_ref, dk_ref, dk_acc):
    j, s = pl.program_id(1), pl.program_id(2)
    i = cfg.qfirst(j) + s

    @pl.when(s == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)

    @pl.when(i < cfg.nt)
    def _():
        q = q_ref[...].astype(cfg.dtype)
        k = k_ref[...].astype(cfg.dtype)
        g = jnp.where(_tile_mask(cfg, i, j, qseg_ref[...], kseg_ref[...]), g_ref[...], 0.0)
        ds, _ = _tile_grads(cfg, q, w_ref[...], k, g)
        dk_acc[...] += dot_tn(ds.astype(cfg.dtype), q)

    @pl.when(s == cfg.nt - 1)
    def _():
        dk_ref[...] = dk_acc[...]


def _tpu_bwd(cfg: IdxCfg, qr, wr, keys, qseg, kseg, g):
    from jax.experimental.pallas import tpu as pltpu

    B, R, bt, bn = cfg.B, cfg.R, cfg.bt, cfg.bn
    rows = cfg.Tp * cfg.nIp
    jc = functools.partial(_clamp_block, cfg)  # clamp: no useless DMAs
    dq, dw = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(B, cfg.nt, cfg.nn),
            in_specs=[pl.BlockSpec((None, R, cfg.cIp), lambda b, i, j: (b, i, 0)),
                      pl.BlockSpec((None, R, 1), lambda b, i, j: (b, i, 0)),
                      pl.BlockSpec((None, bn, cfg.cIp), lambda b, i, j: (b, jc(i, j), 0)),
                      pl.BlockSpec((None, bt, 1), lambda b, i, j: (b, i, 0)),
                      pl.BlockSpec((None, 1, bn), lambda b, i, j: (b, 0, jc(i, j))),
                      pl.BlockSpec((None, bt, bn), lambda b, i, j: (b, i, jc(i, j)))],
            out_specs=[pl.BlockSpec((None, R, cfg.cIp), lambda b, i, j: (b, i, 0)),
                       pl.BlockSpec((None, R, 1), lambda b, i, j: (b, i, 0))],
            scratch_shapes=[pltpu.VMEM((R, cfg.cIp), F32), pltpu.VMEM((R, 1), F32)]),
        out_shape=[jax.ShapeDtypeStruct((B, rows, cfg.cIp), F32), jax.ShapeDtypeStruct((B, rows, 1), F32)],
        interpret=cfg.backend.interpret_arg,
        name="v4_indexer_dq",
        **_compiler_params(cfg, ("parallel", "parallel", "arbitrary")),
    )(qr, wr, keys, qseg, kseg, g)
    ic = lambda j, s: jnp.minimum(cfg.qfirst(j) + s, cfg.nt - 1)
    dk = pl.pallas_call(
        functools.partial(_tpu_dk_kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(B, cfg.nn, cfg.nt),
            in_specs=[pl.BlockSpec((None, R, cfg.cIp), lambda b, j, s: (b, ic(j, s), 0)),
                      pl.BlockSpec((None, R, 1), lambda b, j, s: (b, ic(j, s), 0)),
                      pl.BlockSpec((None, bn, cfg.cIp), lambda b, j, s: (b, j, 0)),
                      pl.BlockSpec((None, bt, 1), lambda b, j, s: (b, ic(j, s), 0)),
                      pl.BlockSpec((None, 1, bn), lambda b, j, s: (b, 0, j)),
                      pl.BlockSpec((None, bt, bn), lambda b, j, s: (b, ic(j, s), j))],
            out_specs=pl.BlockSpec((None, bn, cfg.cIp), lambda b, j, s: (b, j, 0)),
            scratch_shapes=[pltpu.VMEM((bn, cfg.cIp), F32)]),
        out_shape=jax.ShapeDtypeStruct((B, cfg.Np, cfg.cIp), F32),
        interpret=cfg.backend.interpret_arg,
        name="v4_indexer_dk",
        **_compiler_params(cfg, ("parallel", "parallel", "arbitrary")),
    )(qr, wr, keys, qseg, kseg, g)
    return dq, dk, dw


# ============================================================================= custom_vjp + public API

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, qr, keys, wr, qseg, kseg):
    return _fwd(cfg, qr, wr, keys, qseg, kseg)


def _core_fwd(cfg, qr, keys, wr, qseg, kseg):
    return _fwd(cfg, qr, wr, keys, qseg, kseg), (qr, keys, wr, qseg, kseg)


def _core_bwd(cfg, res, g):
    qr, keys, wr, qseg, kseg = res
    bwd = _tpu_bwd if cfg.backend.kind == "tpu" else _portable_bwd
    dq, dk, dw = bwd(cfg, qr, wr, keys, qseg, kseg, g.astype(F32))
    return dq.astype(qr.dtype), dk.astype(keys.dtype), dw.astype(wr.dtype), None, None


_core.defvjp(_core_fwd, _core_bwd)


def indexer_scores(q, keys, weights, *, ratio, segment_ids=None, key_segment_ids=None, block_t=None,
                   block_n=None, backend=None, interpret=None):
    """q ``[B,T,nI,cI]``, keys ``[B,N,cI]``, weights ``[B,T,nI]`` (already scaled) -> scores
    ``[B,T,N]`` fp32 = ``sum_h w[b,t,h] * relu(q[b,t,h] . keys[b,n])``; ``-inf`` where entry n
    is not visible to query t (``n < (t+1)//ratio``, and ``key_segment_ids[b,n] ==
    segment_ids[b,t]`` when segments are given). custom_vjp: grads for q, keys, weights; -inf
    positions get no gradient. ``block_t``: query tokens per block; ``block_n``: entries per block."""
    B, T, nI, cI = q.shape
    N = keys.shape[1]
    if N == 0:
        return jnp.zeros((B, T, 0), F32)
    be = resolve_backend(backend, interpret)
    cd = jnp.result_type(q.dtype, keys.dtype)
    if be.kind == "tpu":
        nIp, cIp = align_dim(nI, 16 if jnp.dtype(cd).itemsize < 4 else 8), align_dim(cI, 128)
        bt = round_up(block_t or max(8, 512 // nIp), 8)
        bn = round_up(block_n or 256, 128)
    elif be.gpu and not be.interpret:
        nIp, cIp = next_pow2(nI), max(16, next_pow2(cI))
        bt = max(next_pow2(block_t or max(1, 64 // nIp)), next_pow2(max(1, 16 // nIp)), 16)
        bn = max(16, next_pow2(block_n or 64))
    else:
        nIp, cIp = nI, cI
        bt = block_t or 8
        bn = block_n or 32
    Tp, Np = round_up(T, bt), round_up(N, bn)
    cfg = IdxCfg(ratio=int(ratio), B=B, T=T, Tp=Tp, nI=nI, nIp=nIp, cI=cI, cIp=cIp, N=N, Np=Np, bt=bt, bn=bn,
                 cd=jnp.dtype(cd).name, backend=be)
    qr = pad_axis(pad_axis(pad_axis(q.astype(cd), 1, Tp), 2, nIp), 3, cIp).reshape(B, Tp * nIp, cIp)
    kp = pad_axis(pad_axis(keys.astype(cd), 1, Np), 2, cIp)
    wr = pad_axis(pad_axis(weights.astype(F32), 1, Tp), 2, nIp).reshape(B, Tp * nIp, 1)
    if segment_ids is None:
        qseg, kseg = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, N), jnp.int32)
    else:
        if key_segment_ids is None:
            raise ValueError("key_segment_ids is required when segment_ids is given")
        qseg, kseg = segment_ids.astype(jnp.int32), key_segment_ids.astype(jnp.int32)
    qseg = pad_axis(qseg, 1, Tp, -1)[:, :, None]
    kseg = pad_axis(kseg, 1, Np, -2)[:, None, :]
    out = _core(cfg, qr, kp, wr, qseg, kseg)
    return out[:, :T, :N]


def indexer_topk(scores, k):
    """Top-``min(k, N)`` entries of ``scores [B,T,N]`` (``-inf`` = not visible) as int32
    ``[B,T,min(k,N)]``; picks that are not visible become -1 (same as ``select_topk``). No
    gradient flows through the selection. Ties go to the lower index (``lax.top_k`` is stable)."""
    k = min(int(k), scores.shape[-1])
    vals, idx = lax.top_k(lax.stop_gradient(scores), k)
    return jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)
