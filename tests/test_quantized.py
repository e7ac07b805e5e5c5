"""FP8 / FP4 block quantisation (``v4jax.layers.quantized``; spec 8) against an independent numpy
reference of the formats, the committed ``official_fp8`` fixture, and QAT (``V4Config.qat``).

The reference below is written from the format definitions alone (it calls nothing of
``quantized.py``):

* FP4 (MXFP4, routed experts): per 1 x 32 block along ``in``, scale = the smallest power of two
  ``s`` with ``6 s >= amax`` (``amax`` floored at 1e-4), e8m0; value = the nearest of
  ``0, .5, 1, 1.5, 2, 3, 4, 6`` to ``|x| / s``, ties to the even code index (the e2m1 value whose
  mantissa bit is 0), the sign in bit 3, never a negative-zero code; two codes per byte, LOW
  nibble first.
* FP8: per 128 x 128 tile (partial edge tiles), scale = the smallest power of two ``s`` with
  ``448 s >= amax`` (floored at 1e-4), codes = ``x / s`` cast to e4m3fn (``ml_dtypes``: round to
  nearest even).

The scale search uses exact float64 comparisons (``fmax * 2^e >= amax``), not ``log2``.
"""

from __future__ import annotations

import os

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import random_variables, small_config

from v4jax.config import ConfigError, V4Config
from v4jax.layers import quantized as qw
from v4jax.weights.quant import dequant_fp4, dequant_fp8_block
from v4jax.weights.safetensors_io import SafetensorsFile

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_fp8", "model.safetensors")
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# jitted, as the model, the export and the native path run them (test_fp8_subnormal_codes_and_ties: eagerly)
QC = jax.jit(qw.quantize_checkpoint, static_argnums=(1, 2, 3, 4))
Q = jax.jit(qw.quantize, static_argnums=(1, 2, 3))
DQC = jax.jit(qw.dequantize_checkpoint)
DQ = jax.jit(qw.dequantize, static_argnums=1)


# -- the numpy reference --------------------------------------------------------------------------

def ref_pow2_scale(amax: np.ndarray, fmax: float) -> np.ndarray:
    """Smallest power of two ``s`` with ``fmax * s >= max(amax, 1e-4)`` (float64, exact tests)."""
    a = np.maximum(np.asarray(amax, np.float64), 1e-4)
    e = np.ceil(np.log2(a / fmax)).astype(np.int64)       # a guess, then fixed by exact comparisons
    e = np.where(fmax * np.ldexp(1.0, e - 1) >= a, e - 1, e)
    e = np.where(fmax * np.ldexp(1.0, e) >= a, e, e + 1)
    assert np.all(fmax * np.ldexp(1.0, e) >= a) and np.all(fmax * np.ldexp(1.0, e - 1) < a)
    return np.ldexp(1.0, e)


def ref_e2m1_codes(y: np.ndarray) -> np.ndarray:
    """Values with ``|y| <= 6`` -> e2m1 codes (uint8 0..15): nearest grid value, ties to the even
    index, sign bit 3 only for a non-zero magnitude."""
    mag = np.abs(np.asarray(y, np.float64))
    assert mag.max(initial=0) <= 6.0
    d = np.abs(mag[..., None] - E2M1_GRID)                 # [..., 8]
    best = d.min(axis=-1, keepdims=True)
    cand = d == best                                        # one index, or two on a tie
    idx = np.where(cand, np.arange(8), 99)
    even = np.where(cand & (np.arange(8) % 2 == 0), np.arange(8), 99).min(axis=-1)
    idx = np.where(cand.sum(-1) > 1, even, idx.min(axis=-1))
    sign = (np.asarray(y) < 0) & (idx > 0)
    return (idx + 8 * sign).astype(np.uint8)


def ref_e2m1_value(codes: np.ndarray) -> np.ndarray:
    c = codes.astype(np.int64)
    return np.where(c >= 8, -1.0, 1.0) * E2M1_GRID[c & 7]


def ref_fp4(x: np.ndarray):
    """Checkpoint layout ``[..., out, in]`` -> (packed uint8 [..., out, in/2], scales float64
    [..., out, in/32], dequantized float64 values [..., out, in])."""
    x = np.asarray(x, np.float32).astype(np.float64)
    *lead, out, inn = x.shape
    blocks = x.reshape(*lead, out, inn // 32, 32)
    s = ref_pow2_scale(np.abs(blocks).max(-1), 6.0)
    codes = ref_e2m1_codes(blocks / s[..., None]).reshape(x.shape)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    values = (ref_e2m1_value(codes).reshape(blocks.shape) * s[..., None]).reshape(x.shape)
    return packed, s, values


def ref_fp8(x: np.ndarray, block=(128, 128)):
    """Checkpoint layout ``[..., out, in]`` -> (e4m3fn codes, scales [..., ceil(out/bo),
    ceil(in/bi)], dequantized float64 values); partial edge tiles."""
    x = np.asarray(x, np.float32)
    *lead, out, inn = x.shape
    bo, bi = block
    so, si = -(-out // bo), -(-inn // bi)
    s = np.empty((*lead, so, si))
    codes = np.empty(x.shape, ml_dtypes.float8_e4m3fn)
    for i in range(so):
        for j in range(si):
            tile = x[..., i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            sc = ref_pow2_scale(np.abs(tile).max(axis=(-2, -1)), 448.0)
            s[..., i, j] = sc
            codes[..., i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = \
                (tile / sc[..., None, None].astype(np.float32)).astype(ml_dtypes.float8_e4m3fn)
    full = np.repeat(np.repeat(s, bo, -2), bi, -1)[..., :out, :inn]
    return codes, s, codes.astype(np.float64) * full


def ref_to_checkpoint(w: np.ndarray, layout: str) -> np.ndarray:
    """v4jax's layout -> the checkpoint's ``[..., out, in]``: ``t`` = ``[..., in, out]``;
    ``wo_a`` = ``[..., g, in, d_g]`` with checkpoint row ``g * d_g + j``."""
    if layout == "t":
        return np.swapaxes(w, -1, -2)
    *lead, g, inn, dg = w.shape
    out = np.empty((*lead, g * dg, inn), w.dtype)
    for k in range(g):
        out[..., k * dg:(k + 1) * dg, :] = np.swapaxes(w[..., k, :, :], -1, -2)
    return out


def ref_to_ours(x: np.ndarray, layout: str, groups: int) -> np.ndarray:
    if layout == "t":
        return np.swapaxes(x, -1, -2)
    *lead, out, inn = x.shape
    dg = out // groups
    return np.stack([np.swapaxes(x[..., k * dg:(k + 1) * dg, :], -1, -2) for k in range(groups)], axis=-3)


def scale_exponent_bytes(s: np.ndarray) -> np.ndarray:
    """e8m0 bytes of power-of-two scales: ``127 + log2(s)``."""
    m, e = np.frexp(s)
    assert np.all(m == 0.5)
    return (e - 1 + 127).astype(np.uint8)


# -- test matrices ---------------------------------------------------------------------------------

def nasty(shape, seed, block_in=32):
    """Random normal values with, per row, ties, near-ties, zeros, an all-zero block, huge and
    tiny magnitudes and exact scale boundaries (amax = fmax * 2^k and its float32 neighbours)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-4, 4, shape[:-1] + (1,)))).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    n = flat.shape[0]
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -2.5, -5.0, 0.0, -0.0], np.float32)
    near = np.concatenate([np.nextafter(ties[:7], np.float32(9)), np.nextafter(ties[:7], np.float32(-9))])
    for r in range(n):
        kind = r % 6
        if kind == 0 and shape[-1] >= 32:            # one block: amax exactly 6 (scale 1), ties in it
            flat[r, :32] = 0.0
            flat[r, 0] = 6.0
            flat[r, 1:1 + len(ties)] = ties
            flat[r, 16:16 + len(near)] = near
        elif kind == 1 and shape[-1] >= 32:          # scale 2^-3 and 2^5: the same ties scaled
            k = -3 if r % 12 == 1 else 5
            flat[r, :32] = 0.0
            flat[r, 0] = -6.0 * 2.0 ** k
            flat[r, 1:1 + len(ties)] = ties * np.float32(2.0 ** k)
        elif kind == 2:                              # an all-zero block
            flat[r, :block_in] = 0.0
        elif kind == 3:                              # huge / tiny magnitudes (tiny: below the amax floor)
            flat[r] *= np.float32(1e30 if r % 12 == 3 else 1e-12)
        elif kind == 4 and shape[-1] >= 32:          # amax at a scale boundary and its neighbours
            b = np.float32(6.0 * 2.0 ** (r % 5 - 2))
            flat[r, 0] = b
            flat[r, 32 % shape[-1]] = np.nextafter(b, np.float32(99))
            flat[r, (64 % shape[-1])] = np.nextafter(b, np.float32(0))
    return flat.reshape(shape)


# -- FP4 ---------------------------------------------------------------------------------------

def test_reference_e2m1_ties():
    """The reference itself: the ties named by the format (round to nearest even)."""
    y = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 0.2, 0.3, 5.01, 6.0])
    np.testing.assert_array_equal(ref_e2m1_value(ref_e2m1_codes(y)),
                                  [0, 1, 1, 2, 2, 4, 4, 0, -4, 0, 0.5, 6, 6])
    assert ref_e2m1_codes(np.array([-0.25, -0.0, -0.1]))[:].tolist() == [0, 0, 0]    # no negative zero


@pytest.mark.parametrize("shape", [(6, 64), (5, 96), (3, 7, 128), (2, 2, 3, 32)])
def test_fp4_quantize_checkpoint_matches_reference(shape):
    x = nasty(shape, seed=sum(shape))
    q = QC(jnp.asarray(x), "fp4")
    packed, s, values = ref_fp4(x)
    assert q.fmt == "fp4" and q.codes.dtype == np.uint8 and q.codes.shape == shape[:-1] + (shape[-1] // 2,)
    assert q.scale.dtype == jnp.float8_e8m0fnu and q.scale.shape == shape[:-1] + (shape[-1] // 32,)
    np.testing.assert_array_equal(np.asarray(q.codes), packed)
    np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), scale_exponent_bytes(s))
    np.testing.assert_array_equal(np.asarray(DQC(q), np.float64), values)
    assert q.checkpoint_shape == shape


def test_fp4_ties_pack_and_scale_exactly():
    """A hand-made row: amax 6 (scale 1), every tie, a negative tie to zero, and the nibble order."""
    row = np.zeros((1, 64), np.float32)
    row[0, :16] = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -5, 0.5, -6, 1.5, 3, 4]
    row[0, 32:] = 0.0                                         # an all-zero block: scale 2^-15
    q = QC(jnp.asarray(row), "fp4")
    vals = np.asarray(DQC(q))[0, :16]
    np.testing.assert_array_equal(vals, [6, 0, 1, 1, 2, 2, 4, 4, 0, -1, -4, 0.5, -6, 1.5, 3, 4])
    b = np.asarray(q.codes)[0]
    assert b[0] == (0x7 | 0x0 << 4)          # 6 (low nibble), then 0.25 -> +0 (high nibble)
    assert b[4] == (0x0 | 0xA << 4)          # -0.25 -> code 0 (not 8), -0.75 -> -1.0 = 0b1010
    np.testing.assert_array_equal(np.asarray(q.scale, np.float32)[0], [1.0, 2.0 ** -15])
    assert not np.any(b[16:])


@pytest.mark.parametrize("layout,shape,groups", [("t", (3, 64, 40), 1), ("wo_a", (2, 32, 24), 2),
                                                 ("t", (2, 2, 96, 8), 1)])
def test_fp4_quantize_layouts(layout, shape, groups):
    """``quantize`` takes v4jax's layout (experts ``[E, in, out]``; ``wo_a`` ``[g, in, d_g]``) and
    stores the checkpoint's; ``dequantize`` gives v4jax's layout back."""
    w = nasty(shape, seed=7)
    ck = ref_to_checkpoint(w, layout)
    packed, s, values = ref_fp4(ck)
    q = Q(jnp.asarray(w), "fp4", layout, groups)
    assert q.layout == layout and q.groups == groups and q.shape == shape
    np.testing.assert_array_equal(np.asarray(q.codes), packed)
    np.testing.assert_array_equal(np.asarray(q.scale, np.float64), s)
    np.testing.assert_array_equal(np.asarray(DQ(q), np.float64), ref_to_ours(values, layout, groups))


def test_fp4_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        qw.quantize_checkpoint(jnp.ones((4, 48)), "fp4")


# -- FP8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(200, 96), (128, 256), (3, 130, 129), (1, 5)])
def test_fp8_quantize_checkpoint_matches_reference(shape):
    x = nasty(shape, seed=3 + sum(shape), block_in=min(shape[-1], 128))
    q = QC(jnp.asarray(x), "fp8")
    codes, s, values = ref_fp8(x)
    so, si = -(-shape[-2] // 128), -(-shape[-1] // 128)
    assert q.codes.dtype == jnp.float8_e4m3fn and q.codes.shape == shape
    assert q.scale.shape == shape[:-2] + (so, si) and q.block == (128, 128)
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8), codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), scale_exponent_bytes(s))
    np.testing.assert_array_equal(np.asarray(DQC(q), np.float64), values)


def test_fp8_subnormal_codes_and_ties():
    """A tile with amax 448 (scale 1): e4m3 subnormals (2^-9 steps) and ties between codes."""
    x = np.zeros((2, 8), np.float32)
    x[0] = [448, 2.0 ** -9, 1.5 * 2.0 ** -9, 2.5 * 2.0 ** -9, 2.0 ** -11, 17.0, 19.0, -0.0]
    x[1] = [-448, 1.0625, 1.1875, 240.0 + 8, 3 * 2.0 ** -11, -17.0, 300, -2.0 ** -10]
    q = qw.quantize_checkpoint(jnp.asarray(x), "fp8")
    codes, s, values = ref_fp8(x)
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8), codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(qw.dequantize_checkpoint(q), np.float64), values)
    # the ties, spelled out: 1.5*2^-9 -> 2^-8 (even), 2.5*2^-9 -> 2^-8, 17 -> 16, 19 -> 20, 1.0625 -> 1
    np.testing.assert_array_equal(values[0, 1:7], [2.0 ** -9, 2.0 ** -8, 2.0 ** -8, 0.0, 16.0, 20.0])
    np.testing.assert_array_equal(values[1, 1:3], [1.0, 1.25])


@pytest.mark.parametrize("layout,shape,groups", [("t", (200, 96), 1), ("t", (2, 96, 200), 1),
                                                 ("wo_a", (2, 160, 96), 2), ("wo_a", (3, 4, 64, 40), 4)])
def test_fp8_quantize_layouts(layout, shape, groups):
    w = nasty(shape, seed=11, block_in=min(shape[-2], 128))
    ck = ref_to_checkpoint(w, layout)
    codes, s, values = ref_fp8(ck)
    q = Q(jnp.asarray(w), "fp8", layout, groups)
    assert q.shape == shape and q.checkpoint_shape == ck.shape
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8), codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(q.scale, np.float64), s)
    np.testing.assert_array_equal(np.asarray(DQ(q), np.float64), ref_to_ours(values, layout, groups))


# -- the committed fixture (released-checkpoint bytes) ---------------------------------------------

def test_dequantize_checkpoint_matches_numpy_loader_on_fixture():
    """Every FP8 / FP4 tensor of ``official_fp8``: the jnp dequantization equals the numpy loader's
    (``dequant_fp8_block`` / ``dequant_fp4``) bit for bit, and re-quantizing those values gives
    the same values back (scales may halve where a block's largest code is below fmax)."""
    f = SafetensorsFile(FIXTURE)
    n = {"fp8": 0, "fp4": 0}
    try:
        for name, info in sorted(f.tensors.items()):
            if not name.endswith(".weight") or info.dtype not in ("F8_E4M3", "I8"):
                continue
            w, s = f.get(name), f.get(name[:-len("weight")] + "scale")
            if info.dtype == "F8_E4M3":
                fmt, ref = "fp8", dequant_fp8_block(w, s, (128, 128))
                q = qw.QuantizedWeight(jnp.asarray(w), jnp.asarray(s), "fp8")
            else:
                fmt, ref = "fp4", dequant_fp4(w, s)
                q = qw.QuantizedWeight(jnp.asarray(w.view(np.uint8)), jnp.asarray(s), "fp4")
            got = np.asarray(DQC(q))
            np.testing.assert_array_equal(got, ref, err_msg=name)
            again = QC(jnp.asarray(ref), fmt)
            np.testing.assert_array_equal(np.asarray(DQC(again)), ref, err_msg=name)
            if fmt == "fp4":        # and the reference agrees with the fixture's own rounding
                np.testing.assert_array_equal(ref_fp4(ref)[2], ref, err_msg=name)
            n[fmt] += 1
    finally:
        f.close()
    assert n["fp8"] >= 30 and n["fp4"] >= 40, n


# -- fake quantisation (QAT) -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt,layout,shape,groups", [("fp4", "t", (4, 64, 48), 1), ("fp8", "t", (200, 96), 1),
                                                     ("fp8", "wo_a", (2, 96, 80), 2)])
def test_fake_quantize_forward_idempotence_and_straight_through(fmt, layout, shape, groups):
    w = jnp.asarray(nasty(shape, seed=5, block_in=32))
    c = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    dq = DQ(Q(w, fmt, layout, groups))
    fq = jax.jit(qw.fake_quantize, static_argnums=(1, 2, 3))(w, fmt, layout, groups)
    np.testing.assert_array_equal(np.asarray(fq).view(np.uint32), np.asarray(dq).view(np.uint32))  # bitwise
    assert np.abs(np.asarray(fq) - np.asarray(w)).max() > 0            # it does round
    again = DQ(Q(dq, fmt, layout, groups))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(dq))   # idempotent in values
    g = jax.jit(jax.grad(lambda w: jnp.sum(c * qw.fake_quantize(w, fmt, layout, groups))))(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))        # straight-through: exactly c
    # in bf16 the forward is the same rounding, cast
    fq16 = jax.jit(qw.fake_quantize, static_argnums=(1, 2, 3))(w.astype(jnp.bfloat16), fmt, layout, groups)
    assert fq16.dtype == jnp.bfloat16
    ref16 = DQ(Q(w.astype(jnp.bfloat16), fmt, layout, groups), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(fq16, np.float32), np.asarray(ref16, np.float32))


def test_qat_model_gradient_is_plain_gradient_at_quantized_weights():
    """``qat="fp4_experts"``: the loss and every gradient equal (bit for bit) those of the plain
    model evaluated at the fake-quantized expert weights (straight-through: the rounding is in the
    forward only), and differ from the plain model's at the unrounded weights."""
    from v4jax.model.transformer import Transformer

    # one layer, no MTP block, 1 Sinkhorn iteration, XLA:CPU without its LLVM optimisation: the
    # two compiles of the model's gradient take ~3 s each instead of ~9 s (the check is semantic)
    cfg = small_config(n_layers=1, layer_types=("window",), n_hash_layers=0, n_mtp_layers=0, hc_sinkhorn_iters=1)
    qcfg = cfg.replace(qat="fp4_experts")
    variables = random_variables(cfg, seed=2)
    params, buffers = variables["params"], variables["buffers"]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)

    def compiled(c):
        m = Transformer(c)

        def loss(p):     # next-token cross-entropy
            logits = m.apply({"params": p, "buffers": buffers}, ids, with_mtp=False)["logits"]
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(logp, jnp.roll(ids, -1, axis=1)[..., None], -1))
        return jax.jit(jax.value_and_grad(loss)).lower(params).compile({"xla_backend_optimization_level": 0})

    flat = tu.flatten_dict(params, sep="/")
    experts = [k for k in flat if qw.weight_format(k) == ("fp4", "t")]
    assert sorted(k.rsplit("/", 1)[1] for k in experts) == ["w1", "w2", "w3"], experts
    rounded = dict(flat)
    for k in experts:
        rounded[k] = DQ(Q(flat[k], "fp4"))
        assert np.asarray(rounded[k] != flat[k]).mean() > 0.5        # most values do move
    rounded = tu.unflatten_dict(rounded, sep="/")

    plain = compiled(cfg)
    lq, gq = compiled(qcfg)(params)
    lp, gp = plain(rounded)
    l0, g0 = plain(params)
    assert np.isfinite(float(lq)) and float(lq) == float(lp)
    assert abs(float(lq) - float(l0)) > 1e-4                        # the rounding is visible in the loss
    fq, fp, f0 = (tu.flatten_dict(g, sep="/") for g in (gq, gp, g0))
    assert fq.keys() == fp.keys() == flat.keys()
    for k in fq:
        np.testing.assert_array_equal(np.asarray(fq[k]), np.asarray(fp[k]), err_msg=k)
    for k in experts:      # and not the gradient at the unrounded weights
        a, b = np.asarray(fq[k]), np.asarray(f0[k])
        assert np.abs(b).max() > 0 and np.abs(a - b).max() > 1e-3 * np.abs(b).max(), k


def test_qat_mode_validation():
    with pytest.raises(ConfigError, match="qat"):
        V4Config(qat="bogus")
    with pytest.raises(ConfigError, match="qat"):
        small_config(qat="fp4")
    from v4jax.train.config import TrainConfig, train_preset

    tc = train_preset("tiny", ["model.qat=fp4_experts"])
    assert tc.model.qat == "fp4_experts"
    assert TrainConfig.from_dict(tc.to_dict()).model.qat == "fp4_experts"       # saved and resumed
    with pytest.raises(ConfigError, match="V4Config.qat: must be one of"):
        train_preset("tiny", ["model.qat=bogus"])
    with pytest.raises(ValueError, match="unknown QAT mode"):
        qw.qat_format("bogus", "fp4")
    assert qw.qat_format("fp4_experts", "fp4") == "fp4" and qw.qat_format("fp4_experts", "fp8") is None
    assert qw.qat_format("fp4_experts+fp8", "fp8") == "fp8" and qw.qat_format("none", "fp4") is None
