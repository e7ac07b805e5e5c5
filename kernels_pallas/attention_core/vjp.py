"""The differentiable core and the public entry of the attention kernels.

``_core`` is a ``custom_vjp`` over the kernel-layout arrays (query rows ``[B, Tp*Hp, cp]``,
padded kv / compressed rows, segment columns): the forward and the backward pick the TPU or the
portable wrapper from ``cfg.backend``; ``delta``, the lse cotangent and ``dsink`` are cheap jnp
reductions here. ``attention(...)`` plans the call (``plan.plan_attention``), pads and reshapes
the inputs into those layouts, runs ``_core`` and slices the padding off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas._common import pad_axis
from kernels_pallas.attention_core.plan import F32, plan_attention
from kernels_pallas.attention_core.portable import portable_bwd, portable_fwd
from kernels_pallas.attention_core.tpu import tpu_bwd, tpu_fwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, qr, kv, sink_rows, comp, aux, qseg, kseg):
    return _fwd_impl(cfg, qr, kv, sink_rows, comp, aux, qseg, kseg)


def _fwd_impl(cfg, qr, kv, sink_rows, comp, aux, qseg, kseg):
    fwd = tpu_fwd if cfg.backend.kind == "tpu" else portable_fwd
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
    bwd = tpu_bwd if cfg.backend.kind == "tpu" else portable_bwd
    dq, dkv, dcomp = bwd(cfg, qr, qseg, kv, kseg, comp, aux, do, lse, dterm)
    # sink: d out / d z' = -p' out, d lse / d z' = p'  ->  dz' = p' (g_lse - delta)
    B = qr.shape[0]
    p_sink = jnp.exp(sink_rows[None, None] - lse.reshape(B, cfg.nq, cfg.R, 1))
    dsink = jnp.sum(p_sink * (-dterm.reshape(B, cfg.nq, cfg.R, 1)), axis=(0, 1))
    dcomp_out = None if comp is None else dcomp.astype(comp.dtype)
    return (dq.astype(qr.dtype), dkv.astype(kv.dtype), dsink.astype(sink_rows.dtype), dcomp_out,
            None, None, None)


_core.defvjp(_core_fwd, _core_bwd)


def attention(q, kv, sink, comp, topk, *, mode, window, ratio=1, scale=None, segment_ids=None,
              comp_segment_ids=None, block_q=None, block_k=None, block_c=None, chunk_k=None,
              comp_chunk_rows=None, backend=None, interpret=None):
    """Shared entry of ``sparse_attention`` (``mode="topk"``) and ``compressed_attention``
    (``mode="dense"``; ``"window"`` when there are no entries). Returns ``(out [B,T,H,c] f32,
    lse [B,T,H] f32)``."""
    cfg = plan_attention(q, kv, comp, topk, mode=mode, window=window, ratio=ratio, scale=scale, block_q=block_q,
                         block_k=block_k, block_c=block_c, chunk_k=chunk_k, comp_chunk_rows=comp_chunk_rows,
                         backend=backend, interpret=interpret)
    B, T, H, c = q.shape
    mode, be, cd = cfg.mode, cfg.backend, cfg.dtype
    N, Tp, Tk, Hp, cp, Np, Kp, bq, kc = cfg.N, cfg.Tp, cfg.Tk, cfg.Hp, cfg.cp, cfg.Np, cfg.Kp, cfg.bq, cfg.kc

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
