"""Checkpoint exchange (v4jax.weights; spec 3.6, 3.7, 5, 6, 8, 10): official save -> load round
trips (single file, sharded, bf16), FP8 / FP4 dequantization against numpy formulas, the
transformers namings, and the error paths.

Random variables are drawn with numpy over ``jax.eval_shape`` of ``Transformer(cfg).init``
(boxed, as jax arrays): the same tree as a real init, without the ~35 s XLA compile of the
model's forward that ``jax.jit(init)`` costs on a small CPU box.
"""

from __future__ import annotations

import json
import os
import warnings

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from v4jax.config import V4Config, preset
from v4jax.model.layout import layer_tree
from v4jax.params import abstract_variables
from v4jax.weights import (CheckpointError, dequant_fp4, dequant_fp8_block, load_checkpoint,
                           load_variables, naming, save_official, unpack_fp4)
from v4jax.weights.safetensors_io import SafetensorsFile, write_arrays



FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
BF16 = np.dtype(ml_dtypes.bfloat16)


def tiny_cfg(**kw) -> V4Config:
    base = dict(n_layers=3, layer_types=("window", "csa", "hca"), n_hash_layers=1, vocab_size=256,
                moe_inter_dim=64, n_routed_experts=8)
    base.update(kw)
    return preset("tiny", **base)


def random_variables(cfg: V4Config, seed: int = 0, boxed: bool = False):
    """Random values (floats ~ N(0,1), tid2eid in [0, E)) on the model's own variable tree, as
    jax arrays; boxed in LogicallyPartitioned like ``Transformer(cfg).init`` returns when asked."""
    rng = np.random.default_rng(seed)

    def draw(s):
        if jnp.issubdtype(s.dtype, jnp.integer):
            return jnp.asarray(rng.integers(0, cfg.n_routed_experts, s.shape), s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape, np.float32), s.dtype)

    v = jax.tree.map(draw, abstract_variables(cfg, boxed=True))
    return v if boxed else nn.meta.unbox(v)


def flat(v) -> dict[str, np.ndarray]:
    return {k: np.asarray(x) for k, x in tu.flatten_dict(nn.meta.unbox(v), sep="/").items()}


def assert_identical(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, (k, fa[k].dtype, fb[k].dtype)
        assert np.array_equal(fa[k].view(np.uint8), fb[k].view(np.uint8)), k  # bitwise


def read_all(path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    try:
        return {k: f.get(k) for k in f.tensors}
    finally:
        f.close()


def write_ckpt(d, tensors: dict, cfg: V4Config | None = None) -> str:
    os.makedirs(d, exist_ok=True)
    write_arrays(os.path.join(d, "model.safetensors"), tensors)
    if cfg is not None:
        cfg.to_json(os.path.join(d, "config.json"))
    return str(d)


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


@pytest.fixture(scope="module")
def variables(cfg):
    return random_variables(cfg, boxed=True)


@pytest.fixture(scope="module")
def official(cfg, variables, tmp_path_factory):
    """The official-naming tensors of ``variables`` (checkpoint layout, fp32)."""
    d = save_official(variables, cfg, tmp_path_factory.mktemp("official"))
    return read_all(os.path.join(d, "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# naming table
# ---------------------------------------------------------------------------------------------

def test_naming_table_covers_tree_both_ways(cfg):
    from v4jax.model.layout import unstack_variables
    tree = tu.flatten_dict(unstack_variables(cfg, abstract_variables(cfg)), sep="/")   # checkpoint layout
    entries = list(naming.official_entries(tree, cfg.n_layers, cfg.n_mtp_layers))
    assert {p.path for _, p in entries} == set(tree)
    for name, p in entries:
        assert naming.parse(name) == (p,), name
        if p.expert is None:
            assert naming.parse(naming.hf_name(name)) == (p,), naming.hf_name(name)
    names = {n for n, _ in entries}
    assert {"embed.weight", "head.weight", "hc_head_fn", "layers.0.ffn.gate.tid2eid", "layers.2.ffn.gate.bias",
            "layers.1.attn.indexer.compressor.ape", "mtp.0.e_proj.weight", "mtp.0.hc_head_scale",
            "mtp.0.ffn.experts.7.w2.weight", "mtp.0.attn.wo_a.weight"} <= names
    assert "layers.0.ffn.gate.bias" not in names and "layers.2.attn.indexer.wq_b.weight" not in names
    # save_pretrained quirks and ignorable names
    assert naming.parse("model.layers.1.attn.norm.weight")[0].path == "params/layers_1/attn/kv_norm/scale"
    assert naming.parse("model.hc_head.hc_fn")[0].path == "params/hc_head/fn"
    assert naming.parse("head.weight") == naming.parse("lm_head.weight")
    for n in ("mtp.0.emb.tok_emb.weight", "mtp.0.head.weight", "model.rotary_emb.inv_freq"):
        assert naming.is_ignored(n)
    assert not naming.is_ignored("mtp.0.hc_head_fn")


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------

def test_round_trip_official_single_file(cfg, variables, tmp_path):
    d = save_official(variables, cfg, tmp_path / "ck")
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    assert V4Config.from_json(os.path.join(d, "config.json")).layer_types == cfg.layer_types
    loaded, cfg2 = load_variables(d, cfg)
    assert cfg2 == cfg
    assert_identical(loaded, variables)
    assert layer_tree(cfg, loaded["buffers"], 0)["ffn"]["gate"]["tid2eid"].dtype == np.int32
    # default config comes from config.json (same model up to the preset name)
    loaded2, cfg3 = load_variables(d)
    assert cfg3.n_layers == 3 and cfg3.layer_types == cfg.layer_types and cfg3.n_mtp_layers == 1
    assert_identical(loaded2, variables)


def test_round_trip_sharded_with_index(cfg, variables, tmp_path):
    d = save_official(variables, cfg, tmp_path / "ck", shard_bytes=1 << 20)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        wmap = json.load(f)["weight_map"]
    shards = sorted(set(wmap.values()))
    assert len(shards) > 2 and not os.path.exists(os.path.join(d, "model.safetensors"))
    assert all(os.path.exists(os.path.join(d, s)) for s in shards)
    assert "mtp.0.h_proj.weight" in wmap and "layers.1.ffn.experts.3.w3.weight" in wmap
    loaded, _ = load_variables(d, cfg)
    assert_identical(loaded, variables)


def test_round_trip_bfloat16(cfg, variables, tmp_path):
    d = save_official(variables, cfg, tmp_path / "ck", dtype="bfloat16")
    stored = SafetensorsFile(os.path.join(d, "model.safetensors")).tensors
    assert stored["layers.0.attn.wq_a.weight"].dtype == "BF16"
    assert stored["layers.0.hc_attn_fn"].dtype == "F32" and stored["layers.2.ffn.gate.bias"].dtype == "F32"
    assert stored["layers.1.attn.compressor.ape"].dtype == "F32" and stored["layers.0.ffn.gate.tid2eid"].dtype == "I32"
    loaded, _ = load_variables(d, cfg, dtype="bfloat16")
    want = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x,
                        nn.meta.unbox(variables)["params"])
    assert_identical(loaded["params"], want)
    # the buffers keep their dtype; bfloat16 variables saved in bf16 come back bit-identical
    assert_identical(load_variables(save_official({"params": want, "buffers": loaded["buffers"]},
                                                  cfg, tmp_path / "ck2", dtype="bfloat16"),
                                    cfg, dtype="bfloat16").variables,
                     {"params": want, "buffers": loaded["buffers"]})


# ---------------------------------------------------------------------------------------------
# quantization (spec 8)
# ---------------------------------------------------------------------------------------------

def quantize_fp8(w: np.ndarray, b: int = 128):
    """Reference quantizer: per b x b block, scale = 2**ceil(log2(amax / 448)) (ue8m0)."""
    m, n = w.shape
    s = np.empty((-(-m // b), -(-n // b)), np.float32)
    q = np.empty(w.shape, E4M3)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b]
            s[i, j] = 2.0 ** np.ceil(np.log2(max(float(np.abs(blk).max()), 1e-30) / 448.0))
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (blk / s[i, j]).astype(E4M3)
    return q, s


def fp8_expected(q, s, b=128):
    m, n = q.shape
    return q.astype(np.float32) * s[np.arange(m)[:, None] // b, np.arange(n)[None, :] // b]


def quantize_fp4(w: np.ndarray, bs: int = 32):
    """Reference quantizer: nearest e2m1 value per element, ue8m0 scale per 1 x bs block."""
    mags = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    out_f, in_f = w.shape
    s = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(w.reshape(out_f, -1, bs)).max(-1), 1e-30) / 6.0))
    x = w / np.repeat(s, bs, axis=1)
    idx = np.abs(np.abs(x)[..., None] - mags).argmin(-1)
    code = (((x < 0) & (idx > 0)) << 3) | idx
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, s.astype(np.float32), code


def fp4_value(code: int) -> float:
    """e2m1 from its bits: sign = bit 3, exponent = bits 1-2, mantissa = bit 0."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (0.5 * m if e == 0 else 2.0 ** (e - 1) * (1 + 0.5 * m))


@pytest.mark.parametrize("fmt", ["e8m0", "uint8", "float32", "bfloat16"])
def test_fp8_block_dequant_non_divisible(fmt):
    w = np.random.default_rng(1).standard_normal((200, 300)).astype(np.float32)
    w *= np.repeat(np.repeat(np.exp2(np.arange(6).reshape(2, 3)), 128, 0), 128, 1)[:200, :300]
    q, s = quantize_fp8(w)
    assert s.shape == (2, 3) and len(np.unique(s)) > 1
    stored = {"e8m0": s.astype(E8M0), "uint8": (np.log2(s) + 127).astype(np.uint8),
              "float32": s, "bfloat16": s.astype(BF16)}[fmt]
    got = dequant_fp8_block(q, stored)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, fp8_expected(q, s))
    assert np.max(np.abs(got - w) / np.abs(w).max()) < 0.07  # it is a quantization of w


def test_fp4_unpack_all_codes():
    table = np.array([fp4_value(c) for c in range(16)], np.float32)
    np.testing.assert_array_equal(table, [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    every_byte = np.arange(256, dtype=np.uint8)
    got = unpack_fp4(every_byte.view(np.int8)[None])[0].reshape(256, 2)
    np.testing.assert_array_equal(got[:, 0], table[every_byte & 15])  # low nibble first
    np.testing.assert_array_equal(got[:, 1], table[every_byte >> 4])
    assert np.signbit(got[8, 0]) and not np.signbit(got[0, 0])
    # with 1 x 32 scales
    w = np.random.default_rng(2).standard_normal((6, 64)).astype(np.float32)
    packed, s, code = quantize_fp4(w)
    want = table[code] * np.repeat(s, 32, axis=1)
    np.testing.assert_array_equal(dequant_fp4(packed, s.astype(E8M0)), want)
    np.testing.assert_array_equal(dequant_fp4(packed.view(np.uint8), s), want)


FP8_SUFFIXES = (".attn.wq_a.weight", ".attn.wq_b.weight", ".attn.wkv.weight", ".attn.wo_a.weight",
                ".attn.wo_b.weight", ".attn.indexer.wq_b.weight", ".shared_experts.w1.weight",
                ".shared_experts.w2.weight", ".shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")
BF16_SUFFIXES = ("norm.weight", "embed.weight", "head.weight", "compressor.wkv.weight",
                 "compressor.wgate.weight", "weights_proj.weight", "gate.weight")


def quantize_like_release(official: dict):
    """Released-checkpoint storage (spec 8): FP8 + e8m0 128x128 scales, FP4 + e8m0 1x32 scales for
    the routed experts, bf16 for norms/embed/head/compressor, fp32 for the rest. Returns the stored
    tensors and the dequantized fp32 values they stand for."""
    stored, deq = {}, {}
    for n, w in official.items():
        base = n[: -len(".weight")]
        if n.endswith(FP8_SUFFIXES):
            q, s = quantize_fp8(w)
            stored[n], stored[base + ".scale"], deq[n] = q, s.astype(E8M0), fp8_expected(q, s)
        elif ".ffn.experts." in n:
            p, s, code = quantize_fp4(w)
            table = np.array([fp4_value(c) for c in range(16)], np.float32)
            stored[n], stored[base + ".scale"] = p, s.astype(E8M0)
            deq[n] = table[code] * np.repeat(s, 32, axis=1)
        elif n.endswith(BF16_SUFFIXES):
            stored[n] = w.astype(BF16)
            deq[n] = stored[n].astype(np.float32)
        else:
            stored[n] = deq[n] = w
    return stored, deq


def test_load_fp8_fp4_bf16_checkpoint(cfg, official, tmp_path):
    stored, deq = quantize_like_release(official)
    assert stored["layers.0.ffn.experts.0.w1.weight"].dtype == np.int8
    assert stored["layers.0.attn.wkv.scale"].shape == (1, 2)  # 64 rows: a partial 128-block
    d = write_ckpt(tmp_path / "q", stored, cfg)
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        assert b"F8_E4M3" in f.read(1 << 16)
    loaded, _ = load_variables(d, cfg)
    ref = load_variables(write_ckpt(tmp_path / "deq", deq, cfg), cfg).variables
    assert_identical(loaded, ref)
    w1 = layer_tree(cfg, loaded["params"], 1)["ffn"]["experts"]["w1"]
    np.testing.assert_array_equal(w1[3], deq["layers.1.ffn.experts.3.w1.weight"].T)


# ---------------------------------------------------------------------------------------------
# transformers namings
# ---------------------------------------------------------------------------------------------

def to_hf_in_memory(official: dict, cfg: V4Config) -> dict:
    """transformers' state_dict names; experts packed into gate_up_proj [E, 2I, d] (gate first)
    and down_proj [E, d, I]; tid2eid int64."""
    out = {}
    for scope in [f"layers.{i}." for i in range(cfg.n_layers)] + ["mtp.0."]:
        hf_scope = "model." + scope if scope.startswith("layers") else scope
        E = cfg.n_routed_experts
        w1 = np.stack([official[f"{scope}ffn.experts.{e}.w1.weight"] for e in range(E)])
        w3 = np.stack([official[f"{scope}ffn.experts.{e}.w3.weight"] for e in range(E)])
        out[hf_scope + "mlp.experts.gate_up_proj"] = np.concatenate([w1, w3], axis=1)
        out[hf_scope + "mlp.experts.down_proj"] = np.stack(
            [official[f"{scope}ffn.experts.{e}.w2.weight"] for e in range(E)])
    for n, w in official.items():
        if ".ffn.experts." not in n:
            out[naming.hf_name(n)] = w.astype(np.int64) if n.endswith("tid2eid") else w
    return out


def test_load_hf_in_memory_naming(cfg, variables, official, tmp_path):
    hf = to_hf_in_memory(official, cfg)
    assert "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight" in hf
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in hf and "lm_head.weight" in hf
    assert hf["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 128, 256)
    loaded, cfg2 = load_variables(write_ckpt(tmp_path / "hf", hf), cfg)
    assert cfg2 == cfg
    assert_identical(loaded, variables)


def test_load_save_pretrained_naming(cfg, variables, official, tmp_path):
    """transformers 5.x save_pretrained: official leaf names under ``model.``, except
    embed_tokens / hc_head.hc_* / head.weight and ``attn.norm`` for kv_norm; no MTP."""
    def saved_name(n):
        if n == "head.weight":
            return n
        n = {"embed.weight": "embed_tokens.weight", "hc_head_fn": "hc_head.hc_fn",
             "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale"}.get(n, n)
        return "model." + n.replace(".attn.kv_norm.", ".attn.norm.")

    hf = {saved_name(n): w for n, w in official.items() if not n.startswith("mtp.")}
    with pytest.warns(UserWarning, match="no MTP"):
        loaded, cfg2 = load_variables(write_ckpt(tmp_path / "hf", hf), cfg)
    assert cfg2 == cfg.replace(n_mtp_layers=0)
    want = flat(variables)
    assert_identical(loaded, tu.unflatten_dict({tuple(k.split("/")): v for k, v in want.items()
                                                if "/mtp_" not in k}))


@pytest.mark.skipif(not os.path.exists(os.path.join(FIXTURES, "hf_mixed", "model.safetensors")),
                    reason="hf_mixed fixture not generated")
def test_hf_mixed_fixture_loads():
    d = os.path.join(FIXTURES, "hf_mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = load_checkpoint(d)
    assert not r.mtp_loaded and r.cfg.n_mtp_layers == 0
    raw = read_all(os.path.join(d, "model.safetensors"))
    p = r.variables["params"]
    np.testing.assert_array_equal(p["head"]["kernel"], raw["head.weight"].T)
    np.testing.assert_array_equal(layer_tree(r.cfg, p, 1)["attn"]["kv_norm"]["scale"],
                                  raw["model.layers.1.attn.norm.weight"])
    np.testing.assert_array_equal(layer_tree(r.cfg, r.variables["buffers"], 0)["ffn"]["gate"]["tid2eid"],
                                  raw["model.layers.0.ffn.gate.tid2eid"])


@pytest.mark.parametrize("name", ["official_fp8", "official_flashlike"])
def test_official_fixtures_load(name):
    d = os.path.join(FIXTURES, name)
    if not os.path.exists(os.path.join(d, "config.json")):
        pytest.skip(f"{name} fixture not generated")
    with open(os.path.join(d, "meta.json")) as f:
        has_mtp = bool(json.load(f).get("mtp_keys"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no MTP block" when config.json says 1 but none is stored
        r = load_checkpoint(d)
    assert r.mtp_loaded == has_mtp == (r.cfg.n_mtp_layers == 1)
    for x in jax.tree.leaves(r.variables):
        assert np.all(np.isfinite(x))


# ---------------------------------------------------------------------------------------------
# MTP presence
# ---------------------------------------------------------------------------------------------

def test_mtp_missing_is_reported(cfg, official, tmp_path):
    d = write_ckpt(tmp_path / "nomtp", {n: w for n, w in official.items() if not n.startswith("mtp.")})
    with pytest.raises(CheckpointError, match="no MTP"):
        load_variables(d, cfg, require_mtp=True)
    with pytest.warns(UserWarning):
        r = load_checkpoint(d, cfg)
    assert not r.mtp_loaded and r.cfg.n_mtp_layers == 0 and "mtp_0" not in r.variables["params"]
    assert "mtp_0" not in r.variables["buffers"]


def test_mtp_present_but_not_configured_and_ignorables(cfg, official, tmp_path):
    extra = {"mtp.0.emb.tok_emb.weight": np.zeros((4, 4), np.float32),
             "mtp.0.head.weight": np.zeros((4, 4), np.float32),
             "model.rotary_emb.inv_freq": np.zeros(4, np.float32)}
    d = write_ckpt(tmp_path / "x", {**official, **extra})
    r = load_checkpoint(d, cfg)
    assert r.mtp_loaded and set(extra) <= set(r.ignored)
    r0 = load_checkpoint(d, cfg.replace(n_mtp_layers=0))
    assert not r0.mtp_loaded and "mtp_0" not in r0.variables["params"]
    assert "mtp.0.e_proj.weight" in r0.ignored


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

def _bad(official, tmp_path, cfg, match, drop=(), **replace):
    t = {n: w for n, w in official.items() if n not in drop}
    t.update(replace)
    with pytest.raises(CheckpointError, match=match):
        load_variables(write_ckpt(tmp_path / "bad", t), cfg)


def test_missing_tensor(cfg, official, tmp_path):
    _bad(official, tmp_path, cfg, r"missing 1 tensor.*'layers\.1\.attn\.indexer\.wq_b\.weight'",
         drop=("layers.1.attn.indexer.wq_b.weight",))
    _bad(official, tmp_path, cfg, r"'layers\.2\.ffn\.experts\.5\.w2\.weight'", drop=("layers.2.ffn.experts.5.w2.weight",))


def test_misshaped_tensor(cfg, official, tmp_path):
    _bad(official, tmp_path, cfg, r"'layers\.0\.attn\.wq_a\.weight'.*\[256, 128\].*expected \[128, 256\]",
         **{"layers.0.attn.wq_a.weight": official["layers.0.attn.wq_a.weight"].T.copy()})


def test_unknown_and_misplaced_names(cfg, official, tmp_path):
    _bad(official, tmp_path, cfg, r"'layers\.0\.attn\.wq_c\.weight'",
         **{"layers.0.attn.wq_c.weight": np.zeros((2, 2), np.float32)})
    # an indexer tensor in an HCA layer / a layer the config does not have
    _bad(official, tmp_path, cfg, r"'layers\.2\.attn\.indexer\.wq_b\.weight'.*does not have",
         **{"layers.2.attn.indexer.wq_b.weight": official["layers.1.attn.indexer.wq_b.weight"]})
    _bad(official, tmp_path, cfg, r"'layers\.3\.attn_norm\.weight'",
         **{"layers.3.attn_norm.weight": official["layers.0.attn_norm.weight"]})


def test_quantization_errors(cfg, official, tmp_path):
    w = official["layers.0.attn.wq_a.weight"]
    q, s = quantize_fp8(w)
    _bad(official, tmp_path, cfg, r"'layers\.0\.attn\.wq_a\.weight'.*no companion scale", **{"layers.0.attn.wq_a.weight": q})
    _bad(official, tmp_path, cfg, r"'layers\.0\.attn\.wq_a\.weight'.*cannot dequantize",
         **{"layers.0.attn.wq_a.weight": q, "layers.0.attn.wq_a.scale": np.ones((5, 5), np.float32)})
    _bad(official, tmp_path, cfg, r"'layers\.0\.attn\.wq_a\.weight'.*not quantized but has a scale",
         **{"layers.0.attn.wq_a.scale": s})
    _bad(official, tmp_path, cfg, r"'layers\.0\.ffn\.gate\.tid2eid'.*out of range",
         **{"layers.0.ffn.gate.tid2eid": np.full((256, 2), 8, np.int32)})
