"""v4jax.train.optimizer: hybrid Newton-Schulz, V4 Muon (Algorithm 1), the Muon/AdamW table, the LR
schedule and one jitted optimizer step on the tiny preset. References are numpy (float64) re-implementations,
``np.linalg.svd`` and optax.contrib's own Newton-Schulz."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from v4jax.config import ConfigError, preset
from v4jax.params import abstract_variables
from v4jax.train.optimizer import (
    KELLER_NS_COEFFS,
    V4_NS_COEFFS,
    MatrixView,
    MuonSplit,
    OptimizerConfig,
    UnknownParameterError,
    hybrid_newton_schulz,
    lr_schedule,
    make_optimizer,
    matrix_views,
    muon_layout,
    muon_matrices,
    ns_flops,
    param_labels,
    path_str,
    scale_by_v4_muon,
)

MU, RMS, WD = 0.95, 0.18, 0.1


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def np_ns(x, coeffs=V4_NS_COEFFS, eps=1e-7):
    """Newton-Schulz in float64, written from the V4 report's Algorithm 1."""
    x = np.asarray(x, np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (np.linalg.norm(x) + eps)
    for a, b, c in coeffs:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def np_muon_update(u):
    """One logical matrix: 0.18 sqrt(max(n, m)) NS(u)."""
    return RMS * math.sqrt(max(u.shape)) * np_ns(u)


def ill_conditioned(rng, n, m, lo=1e-3):
    k = min(n, m)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((m, k)))
    return (u * np.logspace(np.log10(lo), 0, k)) @ v.T


def svals(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def muon_once(views, grads):
    """The first V4-Muon update (zero momentum): ``0.18 sqrt(max) NS((1 + mu) G)`` per logical matrix."""
    tx = scale_by_v4_muon(views=views)
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def tiny_params():
    """The tiny preset's parameters in the per-layer (checkpoint) layout: one path per layer."""
    from v4jax.model.layout import unstack_layers
    return unstack_layers(preset("tiny"), abstract_variables(preset("tiny"))["params"])


@pytest.fixture(scope="module")
def tiny_stacked():
    """The same parameters as the model holds them: scanned stacks with a leading layer axis."""
    return abstract_variables(preset("tiny"))["params"]


def flat(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------
# Hybrid Newton-Schulz
# ---------------------------------------------------------------------------------------------

SHAPES = [(64, 64), (48, 160), (160, 48), (128, 96)]


@pytest.mark.parametrize("shape", SHAPES)
def test_hybrid_ns_singular_values_and_polar_factor(rng, shape):
    x = ill_conditioned(rng, *shape)  # singular values spread over 1e-3 .. 1
    o = np.asarray(hybrid_newton_schulz(jnp.asarray(x, jnp.float32)))
    assert o.shape == shape and o.dtype == np.float32
    s = svals(o)
    assert s.min() >= 0.99 and s.max() <= 1.01, (s.min(), s.max())
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(o, u @ vt, atol=2e-3)  # the polar factor U V^T
    # Keller-Jordan's 5 steps alone do not get there: the (2, -1.5, 0.5) tail matters
    s5 = svals(hybrid_newton_schulz(jnp.asarray(x, jnp.float32), KELLER_NS_COEFFS))
    assert s5.min() < 0.5 and s5.max() > 1.1, (s5.min(), s5.max())


def test_hybrid_ns_matches_numpy_and_optax(rng):
    from optax.contrib._muon import orthogonalize_via_newton_schulz

    for shape in SHAPES:
        x = rng.standard_normal(shape)
        o = np.asarray(hybrid_newton_schulz(jnp.asarray(x, jnp.float32)))
        np.testing.assert_allclose(o, np_ns(x), atol=2e-5)
        ref = orthogonalize_via_newton_schulz(jnp.asarray(x, jnp.float32), jnp.asarray(V4_NS_COEFFS), ns_steps=10,
                                              eps=1e-7)
        np.testing.assert_allclose(o, np.asarray(ref), atol=2e-5)
    # Keller-5 coefficients too (the iteration itself, not only the V4 table)
    x = rng.standard_normal((40, 72))
    np.testing.assert_allclose(hybrid_newton_schulz(jnp.asarray(x, jnp.float32), KELLER_NS_COEFFS),
                               np_ns(x, KELLER_NS_COEFFS), atol=2e-5)


def test_hybrid_ns_batch_axes_bf16_and_zero(rng):
    x = rng.standard_normal((2, 3, 24, 56))
    o = np.asarray(hybrid_newton_schulz(jnp.asarray(x, jnp.float32)))
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(o[i, j], np_ns(x[i, j]), atol=2e-5)
    # bf16 operands, fp32 accumulation: still within 1.5 %
    y = ill_conditioned(rng, 64, 160)
    s = svals(hybrid_newton_schulz(jnp.asarray(y, jnp.float32), matmul_dtype=jnp.bfloat16))
    assert s.min() >= 0.985 and s.max() <= 1.015, (s.min(), s.max())
    # a zero gradient stays zero (eps), no NaN
    assert not np.any(np.asarray(hybrid_newton_schulz(jnp.zeros((8, 4)))))


# ---------------------------------------------------------------------------------------------
# Logical matrices
# ---------------------------------------------------------------------------------------------


def test_matrix_views_of_tiny_tree(tiny_params):
    views = matrix_views(tiny_params)
    shapes = {k: v.shape for k, v in flat(tiny_params).items()}
    assert views["layers_0/ffn/experts/w2"] == MatrixView(batch=1)       # [E, I, d]
    assert views["mtp_0/ffn/experts/w1"] == MatrixView(batch=1)
    assert views["layers_3/attn/wo_a"] == MatrixView(batch=1)             # [g, n_h c / g, d_g]
    for csa in ("layers_1/attn/compressor", "layers_5/attn/indexer/compressor"):   # overlap: [d, 2c]
        for w in ("wkv", "wgate"):
            assert views[f"{csa}/{w}/kernel"] == MatrixView(col_blocks=2)
            assert views[f"{csa}/{w}/kernel"].matrix_shape(shapes[f"{csa}/{w}/kernel"]) == \
                (256, shapes[f"{csa}/norm/scale"][0])
    assert views["layers_2/attn/compressor/wkv/kernel"] == MatrixView()   # HCA: [d, c], one matrix
    for p in ("hc_head/fn", "layers_4/hc_ffn/fn", "layers_0/ffn/gate/kernel", "mtp_0/e_proj/kernel",
              "layers_1/attn/indexer/weights_proj/kernel"):
        assert views[p] == MatrixView()
    labels = flat(param_labels(tiny_params))
    assert set(views) == {k for k, v in labels.items() if v == "muon"}


def test_experts_groups_and_compressor_halves_are_separate(rng, tiny_params):
    views = matrix_views(tiny_params)
    shapes = flat(tiny_params)
    paths = ["layers_1/ffn/experts/w1", "layers_1/attn/wo_a", "layers_1/attn/compressor/wkv/kernel",
             "layers_1/attn/indexer/compressor/wgate/kernel", "layers_2/attn/compressor/wgate/kernel"]
    grads = {p: jnp.asarray(rng.standard_normal(shapes[p].shape), jnp.float32) for p in paths}
    # leading experts' gradients 10x larger: a joint normalisation would shrink the other experts
    grads[paths[0]] = grads[paths[0]].at[:4].multiply(10.0)
    out = muon_once({p: views[p] for p in paths}, grads)
    g = {p: np.asarray(v) for p, v in grads.items()}

    for p in paths[:2]:  # stacked: every expert / wo_a group on its own (expert 0 scaled up; 4, 15 not)
        for e in sorted({0, 4, g[p].shape[0] - 1} & set(range(g[p].shape[0]))):
            np.testing.assert_allclose(out[p][e], np_muon_update(g[p][e]), atol=1e-4)
        E, n, m = g[p].shape  # NS of the flattened stack [E n, m], scaled like one expert: not the same
        joint = RMS * math.sqrt(max(n, m)) * np.asarray(hybrid_newton_schulz(grads[p].reshape(E * n, m)))
        joint = joint.reshape(E, n, m)
        assert np.abs(out[p] - joint).max() > 0.05
    for p in paths[2:4]:  # CSA compressors: the two [d, c] halves separately
        c = g[p].shape[1] // 2
        np.testing.assert_allclose(out[p][:, :c], np_muon_update(g[p][:, :c]), atol=1e-4)
        np.testing.assert_allclose(out[p][:, c:], np_muon_update(g[p][:, c:]), atol=1e-4)
        assert np.abs(out[p] - np_muon_update(g[p])).max() > 0.05
    p = paths[4]  # HCA compressor: one matrix
    np.testing.assert_allclose(out[p], np_muon_update(g[p]), atol=1e-4)
    # update RMS = 0.18 for every logical matrix
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))
    for e in range(16):
        assert abs(rms(out[paths[0]][e]) - RMS) < 1e-3
    for p in paths[2:4]:
        c = g[p].shape[1] // 2
        assert abs(rms(out[p][:, :c]) - RMS) < 1e-3 and abs(rms(out[p][:, c:]) - RMS) < 1e-3


def test_bucketed_equals_leaf_by_leaf(rng):
    views = {"a": MatrixView(batch=1), "b": MatrixView(), "c": MatrixView(col_blocks=2), "d": MatrixView()}
    g = {"a": rng.standard_normal((3, 16, 24)), "b": rng.standard_normal((24, 16)),
         "c": rng.standard_normal((16, 48)), "d": rng.standard_normal((8, 40))}
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    one = scale_by_v4_muon(views=views, bucket=False)
    many = scale_by_v4_muon(views=views, bucket=True)
    u1, _ = jax.jit(one.update)(g, one.init(g))
    u2, _ = jax.jit(many.update)(g, many.init(g))
    for k in g:
        np.testing.assert_allclose(u1[k], u2[k], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Momentum, weight decay, the whole optimizer vs numpy
# ---------------------------------------------------------------------------------------------


def test_sum_form_nesterov_momentum_over_three_steps(rng):
    views = {"w": MatrixView(), "e": MatrixView(batch=1)}
    shapes = {"w": (24, 40), "e": (3, 16, 8)}
    tx = scale_by_v4_muon(views=views)
    step = jax.jit(tx.update)
    state = tx.init({k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()})
    M = {k: np.zeros(s) for k, s in shapes.items()}
    for t in range(3):
        G = {k: rng.standard_normal(s) * (1 + 3 * t) for k, s in shapes.items()}
        out, state = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), G), state)
        for k in shapes:
            M[k] = MU * M[k] + G[k]
            nest = MU * M[k] + G[k]
            ref = np_muon_update(nest) if k == "w" else np.stack([np_muon_update(x) for x in nest])
            np.testing.assert_allclose(out[k], ref, atol=2e-4)
            np.testing.assert_allclose(state[0].trace[k], M[k], rtol=1e-5, atol=1e-5)
    # optax.contrib.scale_by_muon (bias-corrected EMA Nesterov) differs from the sum form at step 2
    ox = optax.contrib.scale_by_muon(ns_coeffs=V4_NS_COEFFS, ns_steps=10, beta=MU, eps=1e-7,
                                     weight_dimension_numbers={"w": optax.contrib.MuonDimensionNumbers(0, 1)})
    w = {"w": jnp.zeros(shapes["w"], jnp.float32)}
    s = ox.init(w)
    rng2 = np.random.default_rng(1)
    G1, G2 = rng2.standard_normal(shapes["w"]), rng2.standard_normal(shapes["w"])
    o1, s = ox.update({"w": jnp.asarray(G1, jnp.float32)}, s)
    o2, _ = ox.update({"w": jnp.asarray(G2, jnp.float32)}, s)
    np.testing.assert_allclose(o1["w"], np_ns(G1), atol=2e-5)  # step 1: same direction
    assert np.abs(np.asarray(o2["w"]) - np_ns(MU * (MU * G1 + G2) + G2)).max() > 1e-2  # step 2: not


def small_named_tree(rng):
    """A partial parameter tree with real names (labels are by path): two Muon, two AdamW leaves."""
    return {"embed": {"embedding": rng.standard_normal((32, 16))},
            "norm": {"scale": 1 + 0.1 * rng.standard_normal(16)},
            "layers_0": {"attn": {"wq_a": {"kernel": rng.standard_normal((16, 24)) * 0.2},
                                  "wo_a": rng.standard_normal((2, 12, 8)) * 0.2}}}


def test_make_optimizer_matches_numpy_over_three_steps(rng):
    cfg = OptimizerConfig(total_steps=10, decay_start=5, warmup_steps=0, peak_lr=0.05, final_lr=0.005, clip=1.0)
    p_np = small_named_tree(rng)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p_np)
    tx = make_optimizer(cfg, params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    lr, b1, b2, eps = cfg.peak_lr, 0.9, 0.95, 1e-20
    M = {"wq_a": 0.0, "wo_a": 0.0}
    m = {"embed": 0.0, "norm": 0.0}
    v = {"embed": 0.0, "norm": 0.0}
    for t in range(1, 4):
        g_np = jax.tree.map(lambda x, s=0.5 * t: rng.standard_normal(x.shape) * s, p_np)
        upd, state = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g_np), state, params)
        params = optax.apply_updates(params, upd)
        # numpy reference: clip by global norm, V4 Muon + decoupled wd, AdamW
        gnorm = math.sqrt(sum(float(np.sum(x * x)) for x in jax.tree.leaves(g_np)))
        factor = min(1.0, cfg.clip / gnorm)
        g_np = jax.tree.map(lambda x, s=factor: x * s, g_np)
        a = p_np["layers_0"]["attn"]
        ga = g_np["layers_0"]["attn"]
        M["wq_a"] = MU * M["wq_a"] + ga["wq_a"]["kernel"]
        M["wo_a"] = MU * M["wo_a"] + ga["wo_a"]
        a["wq_a"]["kernel"] = a["wq_a"]["kernel"] * (1 - lr * WD) - lr * np_muon_update(
            MU * M["wq_a"] + ga["wq_a"]["kernel"])
        a["wo_a"] = a["wo_a"] * (1 - lr * WD) - lr * np.stack(
            [np_muon_update(x) for x in MU * M["wo_a"] + ga["wo_a"]])
        for k, (gk, get) in {"embed": (g_np["embed"]["embedding"], ("embed", "embedding")),
                             "norm": (g_np["norm"]["scale"], ("norm", "scale"))}.items():
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            mh, vh = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            w = p_np[get[0]][get[1]]
            p_np[get[0]][get[1]] = w - lr * (mh / (np.sqrt(vh) + eps) + WD * w)
        for (path, got), want in zip(flat(params).items(), jax.tree.leaves(p_np), strict=True):
            np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{path} step {t}")
    # decoupled weight decay: from a fresh state a zero gradient gives W (1 - lr wd), Muon and AdamW alike
    upd, _ = step(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for got, w in zip(jax.tree.leaves(optax.apply_updates(params, upd)), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, np.asarray(w) * (1 - lr * WD), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

# Every parameter of preset("tiny") -> expected optimizer ("*" is one layer index). Written out from the
# V4 report (AdamW: embedding, head, RMSNorm weights, mHC base/scale) plus our choices (sinks and
# compressor position biases to AdamW; mHC fn, router, every other matrix to Muon).
EXPECTED_LABELS = {
    "embed/embedding": "adamw",
    "head/kernel": "adamw",
    "norm/scale": "adamw",
    "hc_head/base": "adamw",
    "hc_head/scale": "adamw",
    "hc_head/fn": "muon",
    # per block (main layers and the MTP block)
    "*/attn_norm/scale": "adamw",
    "*/ffn_norm/scale": "adamw",
    "*/hc_attn/base": "adamw",
    "*/hc_attn/scale": "adamw",
    "*/hc_attn/fn": "muon",
    "*/hc_ffn/base": "adamw",
    "*/hc_ffn/scale": "adamw",
    "*/hc_ffn/fn": "muon",
    "*/attn/attn_sink": "adamw",
    "*/attn/q_norm/scale": "adamw",
    "*/attn/kv_norm/scale": "adamw",
    "*/attn/wq_a/kernel": "muon",
    "*/attn/wq_b/kernel": "muon",
    "*/attn/wkv/kernel": "muon",
    "*/attn/wo_a": "muon",
    "*/attn/wo_b/kernel": "muon",
    "*/attn/compressor/ape": "adamw",
    "*/attn/compressor/norm/scale": "adamw",
    "*/attn/compressor/wkv/kernel": "muon",
    "*/attn/compressor/wgate/kernel": "muon",
    "*/attn/indexer/compressor/ape": "adamw",
    "*/attn/indexer/compressor/norm/scale": "adamw",
    "*/attn/indexer/compressor/wkv/kernel": "muon",
    "*/attn/indexer/compressor/wgate/kernel": "muon",
    "*/attn/indexer/wq_b/kernel": "muon",
    "*/attn/indexer/weights_proj/kernel": "muon",
    "*/ffn/gate/kernel": "muon",
    "*/ffn/experts/w1": "muon",
    "*/ffn/experts/w2": "muon",
    "*/ffn/experts/w3": "muon",
    "*/ffn/shared_experts/w1/kernel": "muon",
    "*/ffn/shared_experts/w2/kernel": "muon",
    "*/ffn/shared_experts/w3/kernel": "muon",
    # MTP block only
    "mtp_0/e_proj/kernel": "muon",
    "mtp_0/h_proj/kernel": "muon",
    "mtp_0/enorm/scale": "adamw",
    "mtp_0/hnorm/scale": "adamw",
    "mtp_0/norm/scale": "adamw",
    "mtp_0/hc_head/base": "adamw",
    "mtp_0/hc_head/scale": "adamw",
    "mtp_0/hc_head/fn": "muon",
}


def _expected(path):
    """(label, table row) of the one row whose pattern matches ``path`` ("*" = one path component)."""
    hits = [(lab, pat) for pat, lab in EXPECTED_LABELS.items()
            if re.fullmatch(re.escape(pat).replace(r"\*", "[^/]+"), path)]
    assert len(hits) == 1, (path, hits)
    return hits[0]


def test_full_label_table_of_tiny_preset(tiny_params):
    labels = flat(param_labels(tiny_params))
    assert len(labels) == 213
    used = set()
    for path, label in labels.items():
        want, pat = _expected(path)
        assert label == want, (path, label, want)
        used.add(pat)
    assert used == set(EXPECTED_LABELS), set(EXPECTED_LABELS) - used  # every row of the table occurs
    assert sum(v == "muon" for v in labels.values()) == 124
    assert sum(v == "adamw" for v in labels.values()) == 89


@pytest.mark.parametrize("path", ["layers_0/attn/new_proj/kernel", "mtp_0/head/kernel", "params/embed/embedding",
                                  "layers_0/ffn/experts/w4", "blocks_0/attn/wo_a"])
def test_unknown_parameter_raises(path):
    tree = {}
    node = tree
    *parents, leaf = path.split("/")
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = jnp.zeros((4, 4))
    tree["embed"] = {"embedding": jnp.zeros((8, 4))}
    with pytest.raises(UnknownParameterError, match="no optimizer rule"):
        param_labels(tree)
    with pytest.raises(UnknownParameterError, match=path):
        make_optimizer(OptimizerConfig(total_steps=10, decay_start=5, warmup_steps=1), tree)


# ---------------------------------------------------------------------------------------------
# Schedule and config
# ---------------------------------------------------------------------------------------------


def test_lr_schedule_values():
    cfg = OptimizerConfig(total_steps=1000, decay_start=600, warmup_steps=100, peak_lr=2.7e-4, final_lr=2.7e-5)
    s = lr_schedule(cfg)
    want = {0: 0.0, 50: 1.35e-4, 99: 2.7e-4 * 0.99, 100: 2.7e-4, 350: 2.7e-4, 599: 2.7e-4, 600: 2.7e-4,
            800: (2.7e-4 + 2.7e-5) / 2,  # cosine midpoint
            700: 2.7e-5 + (2.7e-4 - 2.7e-5) * 0.5 * (1 + math.cos(math.pi * 0.25)),
            1000: 2.7e-5, 5000: 2.7e-5}
    for step, lr in want.items():
        assert float(s(step)) == pytest.approx(lr, rel=1e-5, abs=1e-12), step
    assert cfg.decay_steps == 400
    # no warm-up, no decay
    s2 = lr_schedule(OptimizerConfig(total_steps=50, decay_start=50, warmup_steps=0, peak_lr=1e-3, final_lr=1e-4))
    assert float(s2(0)) == pytest.approx(1e-3) and float(s2(49)) == pytest.approx(1e-3)
    assert float(s2(50)) == pytest.approx(1e-4)


@pytest.mark.parametrize("kw, field", [
    (dict(peak_lr=-1.0), "peak_lr"), (dict(final_lr=1.0), "final_lr"), (dict(warmup_steps=700), "warmup_steps"),
    (dict(decay_start=2000), "decay_start"), (dict(total_steps=-1), "total_steps"),
    (dict(muon_momentum=1.0), "muon_momentum"), (dict(adam_b2=1.5), "adam_b2"), (dict(clip=0.0), "clip"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(muon_rms=0.0), "muon_rms"),
    (dict(muon_ns_coeffs=((1.0, 2.0),)), "muon_ns_coeffs"), (dict(muon_ns_dtype="float16"), "muon_ns_dtype"),
    (dict(warmup_steps=1.5), "warmup_steps"),
])
def test_config_validation_names_the_field(kw, field):
    base = dict(total_steps=1000, decay_start=600, warmup_steps=100)
    base.update(kw)
    with pytest.raises(ConfigError, match=rf"OptimizerConfig\.{field}:"):
        OptimizerConfig(**base)
    OptimizerConfig(total_steps=1000, decay_start=600, warmup_steps=100, clip=None)  # None disables clipping
    # JSON round trip: lists of lists become the tuple table again
    c = OptimizerConfig(total_steps=10, decay_start=5, warmup_steps=1, muon_ns_coeffs=[[2, -1.5, 0.5]])
    assert c.muon_ns_coeffs == ((2.0, -1.5, 0.5),) and hash(c)


# ---------------------------------------------------------------------------------------------
# One jitted step on the whole tiny tree
# ---------------------------------------------------------------------------------------------


def test_update_traces_on_tiny_tree(tiny_params):
    """The whole jitted update on all 213 tiny leaves, traced without compiling (the compiled step below
    is marked slow: ~10 s of XLA compile on 2 CPU cores)."""
    cfg = OptimizerConfig(total_steps=100, decay_start=50, warmup_steps=10)
    tx = make_optimizer(cfg, tiny_params)
    state = jax.eval_shape(tx.init, tiny_params)
    upd, new_state = jax.eval_shape(jax.jit(tx.update), tiny_params, state, tiny_params)
    assert jax.tree.structure(upd) == jax.tree.structure(tiny_params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for u, p in zip(jax.tree.leaves(upd), jax.tree.leaves(tiny_params), strict=True):
        assert (u.shape, u.dtype) == (p.shape, p.dtype)


@pytest.mark.slow
def test_stacked_layers_are_orthogonalised_per_layer(rng, tiny_params, tiny_stacked):
    """Muon on the model's stacked tree equals Muon on the per-layer tree, leaf by leaf: the stacked
    layer axis is a batch axis (each layer's, each expert's matrix on its own)."""
    from v4jax.model.layout import unstack_layers
    cfg = OptimizerConfig(total_steps=100, decay_start=50, warmup_steps=0, peak_lr=1e-2, final_lr=1e-3)
    tiny = preset("tiny")
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), tiny_stacked)
    grads = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), tiny_stacked)
    views = matrix_views(tiny_stacked)
    assert views["stack_2/layer_1/ffn/experts/w1"] == MatrixView(batch=2)            # [layers, E, d, I]
    assert views["stack_2/layer_1/attn/compressor/wkv/kernel"] == MatrixView(batch=1, col_blocks=2)
    tx_s, tx_c = make_optimizer(cfg, tiny_stacked), make_optimizer(cfg, tiny_params)
    upd_s, _ = jax.jit(tx_s.update)(grads, tx_s.init(params), params)
    p_c, g_c = unstack_layers(tiny, params), unstack_layers(tiny, grads)
    upd_c, _ = jax.jit(tx_c.update)(g_c, tx_c.init(p_c), p_c)
    a, b = flat(unstack_layers(tiny, upd_s)), flat(upd_c)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=2e-4, atol=1e-7, err_msg=k)


def test_jit_step_on_tiny_tree(rng, tiny_stacked):
    tiny_params = tiny_stacked
    cfg = OptimizerConfig(total_steps=100, decay_start=50, warmup_steps=0, peak_lr=1e-2, final_lr=1e-3)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), tiny_params)
    grads = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), tiny_params)
    tx = make_optimizer(cfg, tiny_params)  # built from shapes only
    state = tx.init(params)
    upd, state = jax.jit(tx.update)(grads, state, params)
    # the state is a plain pytree of arrays (orbax-saveable); the counters moved
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    assert sorted(int(x) for x in leaves if x.ndim == 0 and x.dtype == jnp.int32) == [1, 1, 1]
    labels = flat(param_labels(tiny_params))
    views = matrix_views(tiny_params)
    lr = cfg.peak_lr
    P, G, U = flat(params), flat(grads), flat(upd)
    for path, label in labels.items():
        u, w, g = np.asarray(U[path]), np.asarray(P[path]), np.asarray(G[path])
        assert np.all(np.isfinite(u)) and np.all(u != 0), path
        if label == "adamw":  # first Adam step: m_hat / sqrt(v_hat) = sign(g) (eps = 1e-20)
            np.testing.assert_allclose(u, -lr * (np.sign(g) + WD * w), rtol=1e-5, atol=1e-9, err_msg=path)
        else:  # W <- W (1 - lr wd) - lr O with RMS(O) = 0.18 for every logical matrix
            o = -u / lr - WD * w
            k = views[path].col_blocks  # [*batch, n, k m] -> [*batch, n, k, m]: RMS over (n, m)
            r = np.sqrt(np.mean(np.square(o.reshape(*o.shape[:-1], k, -1)), axis=(-3, -1)))
            np.testing.assert_allclose(r, RMS, atol=1e-3, err_msg=path)


# ---------------------------------------------------------------------------------------------
# Distributed Muon's layout (which device orthogonalises what; the mesh tests are in test_parallel)
# ---------------------------------------------------------------------------------------------


def _busiest_over_ideal(mats, mesh_shape, layout):
    devices = math.prod(mesh_shape.values())
    per = sum(-(-k // layout[p].shards(mesh_shape)[0]) * ns_flops(s, l, 1) / layout[p].shards(mesh_shape)[1]
              for p, (k, s, l) in mats.items())
    return per / (sum(k * ns_flops(s, l, 1) for k, s, l in mats.values()) / devices)


def test_muon_layout_splits_matrices_then_long_sides():
    mesh = {"fsdp": 4, "expert": 2}
    mats = {"many": (64, 16, 32), "one": (1, 16, 64), "odd": (3, 5, 7)}
    lay = muon_layout(mats, mesh)
    assert lay["many"] == MuonSplit(("fsdp", "expert"), ())           # 8 matrices per device, no waste
    assert lay["one"].l_axes and lay["one"].shards(mesh)[1] > 1        # 1 matrix on 8 devices: long side split
    assert 16 % lay["one"].shards(mesh)[1] == 0 and 64 % lay["one"].shards(mesh)[1] == 0
    assert lay["odd"].l_axes == ()                                      # 5 x 7 cannot split: padded
    for s in lay.values():                                              # every mesh axis used exactly once
        assert sorted(s.k_axes + s.l_axes) == ["expert", "fsdp"]
    assert muon_layout({"a": (8, 4, 4)}, {}) == {"a": MuonSplit((), ())}   # one device


@pytest.mark.parametrize("preset,mesh", [("flash", {"fsdp": 32, "expert": 8}), ("flash", {"fsdp": 16, "expert": 8}),
                                         ("pro", {"fsdp": 64, "expert": 16}), ("pro", {"fsdp": 32, "expert": 16})])
def test_muon_layout_balances_the_real_models(preset, mesh):
    """#21: Newton-Schulz FLOPs per device at most 1.1 x total / devices on the pods of the issue."""
    from v4jax.params import abstract_variables
    from v4jax.train.config import train_preset

    tc = train_preset(preset)
    params = abstract_variables(tc.model)["params"]
    views = matrix_views(params)
    shapes = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    mats = muon_matrices(views, shapes)
    lay = muon_layout(mats, mesh, tc.optim.muon_balance)
    assert _busiest_over_ideal(mats, mesh, lay) <= 1.1
    # the routed experts (98% of the work) are split over all devices, whole matrices
    experts = [p for p in mats if p.endswith("ffn/experts/w1") and p.startswith("stack_")]
    assert experts and all(lay[p].l_axes == () or mats[p][0] < math.prod(mesh.values()) for p in experts)
