"""Native FP8 / FP4 weights (``load_hf(path, weights="native")``), the exact official export
(``save(quantize="official")``) and the loader's errors for quantized tensors (issue #22, spec 8).

Oracles: the committed ``official_fp8`` fixture (FP8 e4m3 + 128x128 ue8m0 blocks, FP4 e2m1 + 1x32
scales, logits from ``transformers`` on the DEQUANTIZED weights), the numpy dequantizing loader
(``weights="dequantized"``), the checkpoint's own bytes, and the QAT forward."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import random_variables, small_config

import v4jax
from v4jax.layers import quantized as qw
from v4jax.weights import CheckpointError, load_variables
from v4jax.weights.safetensors_io import SafetensorsFile, read_header, write_arrays

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FP8 = os.path.join(FIXTURES, "official_fp8")


@pytest.fixture(scope="module")
def fp8_models():
    return v4jax.load_hf(FP8), v4jax.load_hf(FP8, weights="native")


def _quantized_leaves(params) -> list:
    return [x for x in jax.tree.leaves(params, is_leaf=qw.is_quantized) if qw.is_quantized(x)]


def test_native_leaves_are_the_files_bytes(fp8_models):
    """Every FP8 / FP4 tensor stays quantized (FP4 packed two per byte); the resident bytes are
    within 5% of the checkpoint's tensor bytes (measured from the arrays), and each native
    tensor's codes and scales equal the file's, bit for bit."""
    _, mn = fp8_models
    infos, _ = read_header(os.path.join(FP8, "model.safetensors"))
    q = _quantized_leaves(mn.params)
    assert {x.fmt for x in q} == {"fp8", "fp4"}
    n_scales = sum(1 for n in infos if n.endswith(".scale"))
    # stacked experts and stacked layers hold several file tensors per leaf: count file tensors
    per_leaf = sum(int(np.prod(x.scale.shape[:-2])) for x in q)
    assert per_leaf == n_scales
    resident = sum(x.nbytes for x in jax.tree.leaves(mn.variables))
    on_disk = sum(i.end - i.begin for i in infos.values())
    assert abs(resident / on_disk - 1) < 0.05, (resident, on_disk)
    assert all(x.codes.dtype == np.uint8 for x in q if x.fmt == "fp4")
    f = SafetensorsFile(os.path.join(FP8, "model.safetensors"))
    try:
        w1 = mn.layer_params(0)["ffn"]["experts"]["w1"]
        assert np.array_equal(np.asarray(w1.codes[2]), f.get("layers.0.ffn.experts.2.w1.weight").view(np.uint8))
        wq = mn.layer_params(2)["attn"]["wq_b"]["kernel"]
        assert np.array_equal(np.asarray(wq.codes).view(np.uint8), f.get("layers.2.attn.wq_b.weight").view(np.uint8))
        assert np.array_equal(np.asarray(wq.scale).astype(np.float32), f.get("layers.2.attn.wq_b.scale").astype(np.float32))
    finally:
        f.close()


def test_native_logits_equal_dequantized_and_transformers(fp8_models):
    """Native weights give the dequantized path's logits (the dequantization is exact in fp32) for
    every MoE dispatch, and match transformers' logits as the dequantized loader does."""
    md, mn = fp8_models
    exp = np.load(os.path.join(FP8, "expected.npz"))
    ids = exp["input_ids"]
    ld = np.asarray(md(ids))
    scale = np.abs(ld).max()
    for impl in ("auto", "blocked", "dense", "ragged"):
        ln = np.asarray(mn.with_runtime(moe=impl)(ids))
        assert np.abs(ln - ld).max() <= 1e-5 * scale, impl
    assert np.abs(np.asarray(mn(ids)) - exp["logits"]).max() <= 1e-4 * scale


def test_native_greedy_decode_and_prefix_cache(fp8_models, tmp_path):
    """Decode (prefill, then one token at a time: the blocked dispatch dequantizes only the
    selected experts) gives the dequantized model's greedy tokens, and so does a prefix-cache hit."""
    md, mn = fp8_models
    ids = np.load(os.path.join(FP8, "expected.npz"))["input_ids"][:, :12]
    want = np.asarray(md.generate(ids, 8))
    assert np.array_equal(np.asarray(mn.generate(ids, 8)), want)
    pc = v4jax.PrefixCache(str(tmp_path), max_bytes=10 ** 8)
    first = np.asarray(mn.generate(ids, 8, prefix_cache=pc))
    again = np.asarray(mn.generate(ids, 8, prefix_cache=pc))
    assert np.array_equal(first, want) and np.array_equal(again, want)


def test_reexport_of_native_weights_is_bit_exact(fp8_models, tmp_path):
    """``save(quantize="official", dtype="bfloat16")`` of a native model writes the checkpoint it
    was read from: every tensor with the same dtype and bytes."""
    _, mn = fp8_models
    mn.save(tmp_path, dtype="bfloat16", quantize="official")
    a, b = SafetensorsFile(os.path.join(FP8, "model.safetensors")), SafetensorsFile(str(tmp_path / "model.safetensors"))
    try:
        assert set(a.tensors) == set(b.tensors)
        for n in a.tensors:
            x, y = a.get(n), b.get(n)
            assert x.dtype == y.dtype and x.shape == y.shape, n
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), n
    finally:
        a.close()
        b.close()
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128] and cfg["expert_dtype"] == "fp4"


@pytest.fixture(scope="module")
def qat_export(tmp_path_factory):
    """A model with QAT on every quantized weight, exported in the official storage."""
    cfg = small_config(n_mtp_layers=1, max_seq_len=64, qat="fp4_experts+fp8")
    m = v4jax.V4Model(cfg, random_variables(cfg, seed=5))
    d = tmp_path_factory.mktemp("qat_export")
    m.save(d, quantize="official")
    return m, str(d)


def test_qat_export_is_exact(qat_export):
    """The exported checkpoint, loaded native or dequantized, computes the QAT forward: the
    dequantized load bit for bit (QAT rounds exactly as the export does), native within 1e-6 of
    the logit scale; without QAT the logits differ by far more (the check can fail)."""
    m, d = qat_export
    ids = np.random.default_rng(0).integers(0, m.cfg.vocab_size, (2, 30)).astype(np.int32)
    lq = np.asarray(m(ids))
    scale = np.abs(lq).max()
    md, mn = v4jax.load_hf(d), v4jax.load_hf(d, weights="native")
    assert md.cfg.qat == "none" and mn.cfg.qat == "none"
    assert np.array_equal(np.asarray(md(ids)), lq)
    assert np.abs(np.asarray(mn(ids)) - lq).max() <= 1e-6 * scale
    plain = v4jax.V4Model(m.cfg.replace(qat="none"), m.variables)
    assert np.abs(np.asarray(plain(ids)) - lq).max() > 1e-3 * scale
    infos, _ = read_header(os.path.join(d, "model.safetensors"))
    assert infos["layers.1.ffn.experts.3.w2.weight"].dtype == "I8"
    assert infos["layers.1.attn.wo_a.weight"].dtype == "F8_E4M3"
    assert infos["mtp.0.e_proj.weight"].dtype == "F8_E4M3"
    assert infos["layers.1.attn.wo_a.scale"].dtype == "F8_E8M0"
    assert infos["head.weight"].dtype == "F32" and infos["layers.1.attn.compressor.wkv.weight"].dtype == "F32"


def test_native_speculative_decoding(qat_export):
    """MTP self-speculative decoding on native weights gives plain greedy decoding's tokens."""
    _, d = qat_export
    mn = v4jax.load_hf(d, weights="native")
    ids = np.random.default_rng(1).integers(1, 200, (2, 9)).astype(np.int32)
    plain = np.asarray(mn.generate(ids, 10, stop_tokens=()))
    spec = np.asarray(mn.generate(ids, 10, stop_tokens=(), speculative="mtp"))
    assert np.array_equal(plain, spec)


def test_native_load_peak_host_memory(tmp_path):
    """Peak host allocations while loading native weights: at most 1.3x the checkpoint's bytes
    (the stacked leaves are allocated once and filled in place)."""
    cfg = small_config(dim=128, moe_inter_dim=64, n_routed_experts=16, n_mtp_layers=0)
    v4jax.V4Model(cfg, random_variables(cfg, seed=2)).save(tmp_path, dtype="bfloat16", quantize="official")
    size = os.path.getsize(tmp_path / "model.safetensors")
    load_variables(str(tmp_path), weights="native")        # warm: imports and caches outside the measurement
    tracemalloc.start()
    try:
        v, _ = load_variables(str(tmp_path), weights="native")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    resident = sum(x.nbytes for x in jax.tree.leaves(v))
    assert abs(resident / size - 1) < 0.05 and peak <= 1.3 * size, (peak, resident, size)


def _copy_fixture(tmp_path) -> str:
    d = tmp_path / "ckpt"
    shutil.copytree(FP8, d)
    return str(d)


@pytest.mark.parametrize("weights", ["native", "dequantized"])
def test_scale_that_does_not_tile_its_tensor_names_it(tmp_path, weights):
    d = _copy_fixture(tmp_path)
    f = SafetensorsFile(os.path.join(d, "model.safetensors"))
    arrays = {n: f.get(n) for n in f.tensors}
    f.close()
    bad = "layers.1.ffn.experts.0.w3.scale"
    arrays[bad] = arrays[bad][:, :-1]
    write_arrays(os.path.join(d, "model.safetensors"), arrays)
    with pytest.raises(CheckpointError, match=r"layers\.1\.ffn\.experts\.0\.w3"):
        load_variables(d, weights=weights)
    arrays[bad] = np.ones((64, 8), ml_dtypes.float8_e8m0fnu)
    arrays["layers.2.attn.wq_a.scale"] = np.ones((3, 3), ml_dtypes.float8_e8m0fnu)
    write_arrays(os.path.join(d, "model.safetensors"), arrays)
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.wq_a"):
        load_variables(d, weights=weights)


@pytest.mark.parametrize("change,key", [({"quant_method": "awq"}, "quant_method"), ({"scale_fmt": "fp32"}, "scale_fmt"),
                                        ({"weight_block_size": [128]}, "weight_block_size")])
def test_unknown_quantization_config_is_one_clear_error(tmp_path, change, key):
    d = _copy_fixture(tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["quantization_config"].update(change)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=key):
        load_variables(d, weights="native")


def test_bad_weights_option():
    with pytest.raises(ValueError, match="weights must be one of"):
        load_variables(FP8, weights="fp4")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 simulated CPU devices (conftest)")
def test_native_weights_on_a_mesh(fp8_models):
    """On ``fsdp=2,expert=2,tensor=2`` the native codes and scales are split like the dense leaves
    they replace (scales with their blocks), and the logits equal the dequantized model's on the
    same mesh."""
    md, mn = fp8_models
    ids = np.load(os.path.join(FP8, "expected.npz"))["input_ids"]
    mesh = "fsdp=2,expert=2,tensor=2"
    sd, sn = md.shard(mesh), mn.shard(mesh)
    w1 = sn.layer_params(0)["ffn"]["experts"]["w1"]      # ours [E, d, I] -> codes [E, I, d/2]
    dense = sd.layer_params(0)["ffn"]["experts"]["w1"]
    cs, ds = tuple(w1.codes.sharding.spec), tuple(dense.sharding.spec)
    assert cs[0] == ds[0] and cs[1:] == (ds[2], ds[1]) and any(cs), (cs, ds)
    assert tuple(w1.scale.sharding.spec)[:2] == cs[:2]
    ld = np.asarray(sd(ids))
    assert np.abs(np.asarray(sn(ids)) - ld).max() <= 1e-5 * np.abs(ld).max()
