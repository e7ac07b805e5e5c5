"""Static planning of one attention call: the ``AttnCfg`` (mode, padded geometry, block sizes,
backend), the block-range arithmetic every kernel walks by (window ranges, visible compressed
blocks, the query blocks a key block feeds), the two key masks evaluated inside the kernels,
and ``plan_attention``, which picks the per-backend alignment, default block sizes and padded
sizes for a call. Nothing here launches a kernel."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas._common import Backend, align_dim, cdiv, idiv, lcm, next_pow2, resolve_backend, round_up

F32 = jnp.float32


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


def window_mask(cfg: AttnCfg, tq, qseg, kstart, kseg):
    """tq, qseg ``[R, 1]``; kseg ``[1, bk]`` -> ``[R, bk]``: ``0 <= t - s < window``, same segment."""
    kpos = kstart + lax.broadcasted_iota(jnp.int32, (1, cfg.bk), 1)
    d = tq - kpos
    return (d >= 0) & (d < cfg.window) & (qseg == kseg)


def dense_mask(cfg: AttnCfg, tq, qseg, cstart, cseg):
    """Entry e visible to token t iff ``e < (t+1)//ratio`` (i.e. ``e*ratio + ratio-1 <= t``),
    ``e < N`` and same segment."""
    e = cstart + lax.broadcasted_iota(jnp.int32, (1, cfg.bkc), 1)
    return (e * cfg.ratio + (cfg.ratio - 1) <= tq) & (e < cfg.N) & (qseg == cseg)


def cast(x, cfg):
    return x.astype(cfg.dtype)


def tpu_resident_rows(cp: int) -> int:
    """Rows of the f32 top-k ``dcomp`` accumulator kept in VMEM per backward pass (double-buffered
    output block): ~40 MiB on 128 MiB-VMEM chips (v5e, v6e, v5p), ~5 MiB on older ones."""
    kind = jax.devices()[0].device_kind.lower() if jax.default_backend() == "tpu" else ""
    budget = (5 << 20) if any(v in kind for v in ("v2", "v3", "v4")) else (40 << 20)
    return max(8, (budget // (2 * cp * 4)) // 8 * 8)


def default_blocks(be: Backend, Hp: int):
    """Block sizes when the caller passes none: per backend, ~512 query rows (tokens x padded heads)
    on TPU."""
    if be.kind == "tpu":
        return dict(block_q=max(8, round_up(max(1, 512 // Hp), 8)), block_k=128, block_c=128, chunk_k=128)
    if be.gpu and not be.interpret:
        return dict(block_q=max(1, 64 // Hp), block_k=64, block_c=64, chunk_k=64)
    return dict(block_q=max(8, 64 // max(Hp, 1)), block_k=32, block_c=32, chunk_k=32)


def plan_attention(q, kv, comp, topk, *, mode, window, ratio=1, scale=None, block_q=None, block_k=None,
                   block_c=None, chunk_k=None, comp_chunk_rows=None, backend=None, interpret=None) -> AttnCfg:
    """The ``AttnCfg`` of one call (only shapes and dtypes of the arrays are read). ``mode``
    falls back to ``"window"`` when there are no compressed entries (or, for ``"topk"``, no
    top-k slots); block sizes default per backend and are rounded to what the backend needs."""
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
    d = default_blocks(be, Hp)
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
            dcr = round_up(min(comp_chunk_rows or tpu_resident_rows(cp), Np), 8)
            Np = round_up(Np, dcr)
    else:
        Np = 0
    Kp = round_up(K, kc) if mode == "topk" else 0
    if not (mode == "topk" and be.kind == "tpu"):
        dcr = max(Np, 1)
    return AttnCfg(mode=mode, window=int(window), ratio=int(ratio), scale=scale, B=B, H=H, Hp=Hp, c=c, cp=cp,
                   T=T, Tp=Tp, Tk=Tk, N=N, Np=Np, K=K, Kp=Kp, bq=bq, bk=bk, bkc=bkc, kc=kc, dcr=dcr,
                   cd=jnp.dtype(cd).name, backend=be)
