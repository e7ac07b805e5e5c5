"""``v4jax-plan``: the per-device memory of a training run on a mesh, computed without allocating
anything (``jax.eval_shape`` of the model, the optimizer and the decode cache; shardings from the
one rules table ``v4jax.sharding`` on a ``jax.sharding.AbstractMesh``, so no device is needed).

    v4jax-plan --preset flash --mesh fsdp=32,expert=8 --seq-len 4096 --batch 256 \\
        [--cache-len 1048576 --cache-batch 256] [--hbm-gib 95] [--json out.json] \\
        [--aot [--libtpu DIR --topology v5p:8x8x4]]

Inference mode (``--inference``, ``inference_memory``): the memory of serving, per device,

    v4jax-plan --preset flash --inference --weights native --slice 8xH100 [--mesh expert=8] \\
        [--cache-len 1048576 --cache-batch 8 --cache-format native|fp8] [--compare] [--json out.json]

the resident weights as the released checkpoint stores them (``native``: FP8 e4m3 codes with one
e8m0 scale per 128x128 tile, routed experts FP4 packed two per byte with one scale per 1x32
block, the rest bf16, the fp32 islands fp32; ``v4jax.layers.quantized.WEIGHT_FORMATS``) and
dequantized (``bf16``), side by side, both sharded by the rules table (native codes and scales as
``placement.quantized_sharding`` places them), the decode cache (``init_cache``, split over the
batch axes), and the verdict against the slice's HBM (``SLICES``: ``v5p-8`` = 4 chips, ``v5p-16``
= 8 chips, 95 GiB each; ``8xH100`` 80e9 B, ``8xH200`` 141e9 B). A slice without ``--mesh`` is
served on ``expert=<devices>``; ``--compare`` tabulates every fsdp / expert / tensor mesh on those
devices. Leaves split over a batch axis (``fsdp``; ``expert`` on a dense leaf: the rules table
shards a dense leaf ZeRO-style) are all-gathered layer by layer when served: the largest layer's
gathered share, twice (current + prefetched), is counted as a transient. Activations, compiled
temporaries and XLA's reserved HBM are NOT counted: keep headroom.

What is exact and what is estimated (training):

* EXACT (from shapes and shardings): parameters, optimizer state (``jax.eval_shape(tx.init,
  params)`` of the real optimizer, ``make_optimizer``: Muon momentum for matrices, AdamW mu/nu
  for the rest, sharded like their parameter by ``v4jax.parallel.mesh.mirror_shardings``),
  buffers (router biases, hash tables: replicated), gradients (one per parameter, in the
  parameter's dtype and sharding), the decode cache (``init_cache``, split over the batch axes
  when its batch divides, ``cache_shardings``) and distributed Muon's work and bytes. Per device, a leaf
  takes ``itemsize * prod(ceil(dim_i / shards_i))`` where ``shards_i`` is the product of the mesh
  axes its ``PartitionSpec`` puts on dim i; a dim that does not divide is REPORTED (jit and
  ``device_put`` refuse such a sharding), the byte count then uses the padded shard.
* Muon, distributed (``orthogonalize_updates`` under a mesh, ``muon_layout``): each leaf's ``K``
  logical matrices (``s x l``, s the short side) are split over all devices, ``ceil(K / k_shards)``
  per device (zero-padded), and a leaf with fewer matrices than devices also splits each
  matrix's long side over ``l_shards`` devices (tensor-parallel NS) until the busiest device's
  Newton-Schulz FLOPs are within ``muon_balance`` (1.08) of total / devices where the shapes allow. Per device and
  step: FLOPs ``owned * steps * (4 s^2 l + 2 s^3) / l_shards``; bytes (upper bounds: part may
  already be local) to the owner ``itemsize * owned * s * l / l_shards``, back into the
  parameter's sharding ``itemsize * numel / param_shards``, and for a split long side three fp32
  ``s x s`` collectives per step (Gram reduce-scatter, its all-gather, the polynomial's
  all-gather); the transient is the largest leaf's owned share in and out in fp32 (the leaves
  run one after another).
* ESTIMATED: the activations of one training step (formula below). The compiler's own number is
  ``--aot``: ``jax.jit(train_step).lower(...).compile().memory_analysis()`` for the same state
  and batch shardings, on a TPU topology (``--libtpu``: an unpacked libtpu wheel, used only for
  compilation, see ``kernels_pallas/tpu_aot.py``) or on the local devices (CPU: simulated with
  ``jax_num_cpu_devices``). When the step does not fit a TPU's HBM, libtpu stops with
  ``CompileTimeHbmOom`` and the HLO temporaries it needs: that number is reported
  (``--aot-no-crash-on-oom`` compiles again to completion for the full analysis; slow).

Activation formula (per device; ``N = B_local * T`` tokens, ``B_local = batch / batch shards``,
``n = hc_mult``, ``d = dim``, ``a`` = compute itemsize (``cfg.dtype``), ``f = 4`` (fp32), the
tensors each layer keeps for its backward, as this code computes them):

* ``stream``: the layer's input streams ``N n d a`` (the scan carry: kept under every remat policy);
* ``mhc``: 2 sites x (fp32 streams + RMS-normalised fp32 flat streams ``2 N n d f``, collapsed
  and normed block input ``2 N d a``);
* ``attention``: q latent (fp32 RMS copy, normed) ``N q_lora (f + a)``; q: fp32 RMS copy of
  ``wq_b``'s output, normed+roped q, the core's fp32 input and fp32 output (the XLA attention's
  custom VJP keeps only inputs, output and lse), de-rotated output: ``N H c (3 f + 2 a) + N H f``;
  kv ``N c (2 f + a)``; ``wo_a`` output ``N g o_lora a``; compressor (CSA/HCA) ``wkv``/``wgate`` outputs ``2 N w f``; indexer (CSA)
  queries ``2 N n_I d_I a``, weights ``N n_I f``, its compressor ``2 N 2 d_I f``, top-k ids ``N k 4``;
* ``moe``: norm in/out ``2 N d a``, router logits+scores ``2 N E f``, shared expert ``N I_s (3 f + a)``;
  routed experts as dispatched here (``v4jax.moe.expert_parallel``; dropless: each device sees
  ``G = S N`` tokens of its expert group (S = ``expert`` shards) and the local dispatch keeps
  ``R`` rows (``ragged``/``tokamax``: ``R = G K``, all pairs sorted; ``blocked``: ``nb * b``
  padded blocks; ``dense``: ``E_loc G``): gathered tokens ``G d a``, sorted rows ``R d a``, the
  SwiGLU residuals (gate, sigmoid, silu, up, gated; fp32) ``5 R I f``, w2's input ``R I a``;
  output ``N d f``. With ``Runtime.ep_capacity = c`` (the all-to-all form, the flash and pro
  presets' default) the gathered tokens are replaced by the pairs' tokens ``N K d a``, the send and
  receive buffers ``2 S C d a`` and the returned outputs ``2 S C d f`` (``C = ceil(c N K / S)``), and
  the local dispatch covers ``S C`` rows instead of ``G K``);
* the MTP block: a window layer plus ``2 N n d a + 2 N d a``;
* ``head`` (main and MTP): HC head ``2 N n d f``, norm ``2 N d a``, logits ``N V (a + f)``;
* ``backward working set``: fp32 stream cotangents ``2 N n d f``, one logits cotangent ``N V f``
  and one layer's routed-row cotangents ``R (d + 2 I) f``;
* ``fsdp weight gather``: the largest layer's weights in compute dtype with the ``fsdp`` axis
  gathered (what GSPMD materialises for the layer's matmuls), twice (current + prefetched).

With a ``tensor`` axis the head, output-group, indexer-head, MLP and vocabulary widths above are
divided by its size (the rules table splits them); nothing else is.

Per remat policy (``Runtime.remat``, ``--set runtime.remat=full``): ``none`` keeps every layer's
tensors (``sum_layers all``); ``full`` keeps the streams and recomputes one layer at a time
(``sum_layers stream + max_layer all``); ``save_matmuls`` additionally keeps the non-batched
matmul outputs (projections); ``offload`` keeps what ``full`` keeps on the device. Then
``+ head + backward working set + fsdp weight gather``. The total counts gradients live together
with all activations (an upper bound: a real step frees activations while gradients fill) and
takes ``max(activations, Muon transient)``, the Muon step running after the backward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import sys
import time
from typing import NamedTuple

from jax.sharding import PartitionSpec

import v4jax.params as vp
from v4jax.config import ConfigError
from v4jax.config import preset as model_preset
from v4jax.layers.quantized import FP4_BLOCK, FP8_BLOCK, QuantizedWeight, weight_format
from v4jax.model.transformer import init_cache
from v4jax.moe.experts import (
    MIN_GROUP_LOAD,
    block_rows,
    group_capacities,
    tokamax_available,
)
from v4jax.parallel.mesh import (
    batch_sharding,
    make_mesh,
    mesh_context,
    parse_mesh,
    replicated,
)
from v4jax.parallel.placement import (
    cache_shardings,
    logical_specs,
    quantized_sharding,
    state_shardings,
)
from v4jax.params import abstract_variables, count_params
from v4jax.sharding import (
    BATCH_AXES,
    MESH_AXES,
    batch_axes,
    batch_shards,
    mesh_axes_of,
    to_mesh_spec,
)
from v4jax.train.config import train_preset
from v4jax.train.optimizer import (
    MUON,
    make_optimizer,
    matrix_views,
    muon_layout,
    muon_matrices,
    ns_flops,
    param_labels,
)
from v4jax.train.step import abstract_state, make_train_step
from v4jax.train.step import state_shardings as train_state_shardings

GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# Meshes and per-device bytes
# ---------------------------------------------------------------------------------------------


def abstract_mesh(axes: dict[str, int]):
    """A device-free ``AbstractMesh`` with ``axes`` in ``MESH_AXES`` order (what ``make_mesh``
    builds): ``to_mesh_spec`` / ``rules_for`` only read ``mesh.shape``."""
    import jax

    names = tuple(a for a in MESH_AXES if a in axes)
    return jax.sharding.AbstractMesh(tuple(int(axes[a]) for a in names), names,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _spec_of(x):
    return x.spec if hasattr(x, "spec") else x


def dim_shards(spec, ndim: int, mesh_shape) -> list[int]:
    """Shards per dim of an array with ``PartitionSpec`` ``spec`` on a mesh of ``mesh_shape``."""
    out = []
    entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    for e in entries[:ndim]:
        if e is None:
            out.append(1)
        elif isinstance(e, str):
            out.append(int(mesh_shape[e]))
        else:
            out.append(math.prod(int(mesh_shape[a]) for a in e))
    return out


def nbytes_of(shape, dtype) -> float:
    import jax.numpy as jnp

    n = math.prod(shape)
    if jnp.dtype(dtype) == jnp.float4_e2m1fn:        # packed two per byte (as v4jax.inference.memory)
        return n / 2
    return n * jnp.dtype(dtype).itemsize


def shard_bytes(shape, dtype, spec, mesh_shape, path: str = "", problems: list | None = None) -> float:
    """Bytes one device holds of a leaf; dims that do not divide are appended to ``problems``."""
    shards = dim_shards(spec, len(shape), mesh_shape)
    local = []
    for i, (n, s) in enumerate(zip(shape, shards)):
        if n % s and problems is not None:
            problems.append({"path": path, "shape": list(shape), "dim": i, "size": n, "spec": str(spec),
                             "shards": s,
                             "message": f"{path}: dim {i} of size {n} (shape {tuple(shape)}, spec {spec}) "
                                        f"does not divide into {s} shards"})
        local.append(-(-n // s))
    return nbytes_of(local, dtype)


def _leaves(tree, is_leaf=None):
    import jax

    return [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def tree_bytes(values, shardings, mesh_shape, problems: list | None = None, prefix: str = "") -> dict:
    """``{"global": bytes, "per_device": bytes, "dtypes": {dtype: per-device bytes}}`` of a tree of
    ``ShapeDtypeStruct`` leaves with a matching tree of shardings (or ``PartitionSpec``s)."""
    import jax

    vals = jax.tree.leaves(values)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
                          or hasattr(x, "spec"))
    paths = [p for p, _ in _leaves(values)]
    if len(vals) != len(shs):
        raise ValueError(f"{prefix}: {len(vals)} leaves but {len(shs)} shardings")
    total = per = 0.0
    dtypes: dict[str, float] = {}
    for path, v, s in zip(paths, vals, shs):
        b = shard_bytes(v.shape, v.dtype, _spec_of(s), mesh_shape, f"{prefix}{path}", problems)
        total += nbytes_of(v.shape, v.dtype)
        per += b
        dtypes[str(v.dtype)] = dtypes.get(str(v.dtype), 0) + b
    return {"global": total, "per_device": per, "dtypes": dtypes}


# ---------------------------------------------------------------------------------------------
# Muon: distributed Newton-Schulz (who orthogonalises what, and the bytes it moves)
# ---------------------------------------------------------------------------------------------


def muon_work(params, logical, mesh, ns_steps: int, balance: float = 1.08) -> dict:
    """Per device and step, distributed Muon as ``orthogonalize_updates`` runs it under a mesh
    (``muon_layout``; see the module docstring): Newton-Schulz FLOPs (and their ratio to total /
    devices), the bytes moved, and the largest leaf's transient working set."""
    import jax

    labels = dict(_leaves(param_labels(params)))
    views = matrix_views(params)
    specs = dict(_leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    leaves = {path: leaf for path, leaf in _leaves(params) if labels[path] == MUON}
    shape = {a: int(n) for a, n in mesh.shape.items()}
    mats = muon_matrices(views, {p: x.shape for p, x in leaves.items()})
    layout = muon_layout(mats, shape, balance)
    devices = math.prod(n for n in shape.values() if n > 1) if shape else 1
    rows = []
    for path, leaf in leaves.items():
        K, s, l = mats[path]
        dk, dl = layout[path].shards(shape)
        owned = -(-K // dk)                                    # matrices per device (zero-padded)
        item = jax.numpy.dtype(leaf.dtype).itemsize
        param_shards = math.prod(dim_shards(to_mesh_spec(tuple(specs[path]), mesh, shape=leaf.shape), leaf.ndim, shape))
        share = owned * s * l / dl                             # elements each device orthogonalises
        rows.append({"path": path, "shape": list(leaf.shape), "matrices": K, "short": s, "long": l,
                     "k_axes": list(layout[path].k_axes), "l_axes": list(layout[path].l_axes),
                     "k_shards": dk, "l_shards": dl, "owned": owned, "itemsize": item,
                     "to_owner": item * share, "back": item * leaf.size / param_shards,
                     "ns_collective": owned * ns_steps * 3 * s * s * 4 * (1 - 1 / dl),
                     "transient": 2 * 4 * share,
                     "ns_flop": layout[path].flops_per_device(mats[path], shape, ns_steps),
                     "ns_flop_ideal": K * ns_flops(s, l, ns_steps) / devices})
    ideal = sum(r["ns_flop_ideal"] for r in rows)
    per = sum(r["ns_flop"] for r in rows)
    return {"ns_tflop_per_device": per / 1e12, "ns_tflop_ideal": ideal / 1e12,
            "ns_balance": per / ideal if ideal else 1.0,
            "to_owner_per_device": sum(r["to_owner"] for r in rows),
            "back_per_device": sum(r["back"] for r in rows),
            "ns_collective_per_device": sum(r["ns_collective"] for r in rows),
            "moved_per_device": sum(r["to_owner"] + r["back"] + r["ns_collective"] for r in rows),
            "largest_leaf": max(rows, key=lambda r: r["transient"]) if rows else None,
            "long_side_split": sum(1 for r in rows if r["l_shards"] > 1),
            "leaves": len(rows), "rows": rows}


# ---------------------------------------------------------------------------------------------
# Activations (estimate)
# ---------------------------------------------------------------------------------------------


def _layer_terms(cfg, lt: str, N: int, S: int, moe_impl: str, a: int, mtp: bool = False, ts: int = 1,
                 capacity: float | None = None) -> dict:
    """The tensors one layer keeps for its backward (bytes per device), by group; ``matmul``: the
    part a ``save_matmuls`` policy keeps (outputs of non-batched projections). ``ts``: ``tensor``
    shards, which split the head, output-group and MLP widths (rules table: heads, o_groups,
    index_heads, mlp -> tensor)."""
    f = 4
    n, d = cfg.hc_mult, cfg.dim
    sp = cfg.attention(lt)
    H, c, q, g, ol = sp.n_heads / ts, sp.head_dim, sp.q_lora_rank, sp.o_groups / ts, sp.o_lora_rank
    t = {"stream": N * n * d * a,
         "mhc": 2 * (2 * N * n * d * f + 2 * N * d * a)}
    # q latent: wq_a output (its fp32 RMS copy) and q_norm output; q: fp32 RMS copy of wq_b's output,
    # normed+roped q, the core's fp32 input and fp32 output (+ lse), the de-rotated output; kv the same
    # way at width c; the wo_a output
    att = (N * q * (f + a) + N * H * c * (3 * f + 2 * a) + N * H * f + N * c * (f + a + f)
           + N * g * ol * a)
    mm = N * q * a + N * H * c * a + N * c * a + N * d * a          # wq_a, wq_b, wkv, wo_b outputs
    if sp.compressor is not None:
        w = sp.compressor.out_dim * (2 if sp.compressor.overlap else 1)
        att += 2 * N * w * f
        mm += 2 * N * w * f
    if sp.indexer is not None:
        ix = sp.indexer
        w = ix.compressor.out_dim * (2 if ix.compressor.overlap else 1)
        nI = ix.n_heads / ts
        att += 2 * N * nI * ix.head_dim * a + N * nI * f + 2 * N * w * f + N * ix.topk * 4
        mm += N * nI * ix.head_dim * a + N * nI * f + 2 * N * w * f
    t["attention"] = att
    E, K, I = cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim / ts
    Is = I * cfg.n_shared_experts
    t["moe_router_shared"] = 2 * N * d * a + 2 * N * E * f + N * Is * (3 * f + a) + N * d * f
    mm += 2 * N * Is * f + N * d * a
    G = N * S                                   # tokens of the expert group a device sees
    E_loc = E // max(S, 1)
    if capacity is not None and S > 1:
        # the all-to-all form (v4jax.moe.expert_parallel.experts_all_to_all): S buffers of
        # C = ceil(c N K / S) rows out and in (compute dtype), the outputs back (fp32), the pairs'
        # tokens N K d; the destination's local dispatch over its S C rows
        SC = S * math.ceil(capacity * N * K / S)
        if moe_impl in ("blocked", "grouped"):
            b = block_rows(max(1, N * K), E_loc)
            R = max(1, (SC + E_loc * (b - 1)) // b) * b
        elif moe_impl == "dense":
            R = E_loc * SC
        else:
            R = SC
        t["moe_routed"] = N * K * d * a + 2 * SC * d * a + 2 * SC * d * f + R * d * a + 5 * R * I * f + R * I * a
        t["moe_routed_rows"] = R
    elif moe_impl in ("blocked", "grouped"):
        b = block_rows(max(1, G * K // S), E_loc)
        R = max(1, (G * K + E_loc * (b - 1)) // b) * b
        if moe_impl == "grouped" and S == 1 and G * K >= MIN_GROUP_LOAD * E_loc:
            # lax.switch keeps the residuals of every branch: each capacity level plus blocked
            R += E_loc * sum(group_capacities(G * K, E_loc))
    elif moe_impl == "dense":
        R = E_loc * G
    else:                                        # ragged / tokamax: every pair sorted
        R = G * K
    if capacity is None or S == 1:
        # gathered tokens, sorted rows, SwiGLU residuals (gate, sigmoid, silu, up, gated: fp32), w2's input
        t["moe_routed"] = (G * d * a if S > 1 else 0) + R * d * a + 5 * R * I * f + R * I * a
        t["moe_routed_rows"] = R
    if mtp:
        t["mtp_extra"] = 2 * N * n * d * a + 2 * N * d * a
    t["all"] = sum(v for k, v in t.items() if k not in ("moe_routed_rows",))
    t["matmul"] = mm
    return t


REPLICATED_REPORT_BYTES = 16 << 20     # the planner lists every replicated parameter above this


def _unsplit_params(params, logical, mesh):
    """(every parameter above ``REPLICATED_REPORT_BYTES`` that a mesh of more than one device keeps
    whole on every device, the dims a rule would split but whose size the mesh axes do not divide:
    they fall back to the next rule, or stay whole)."""
    import jax

    specs = dict(_leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    shape = dict(mesh.shape)
    devices = math.prod(shape.values()) if shape else 1
    replicated, unsplit = [], []
    for path, leaf in _leaves(params):
        lg = tuple(specs[path])
        spec = to_mesh_spec(lg, mesh, shape=leaf.shape)
        whole = nbytes_of(leaf.shape, leaf.dtype)
        if devices > 1 and whole > REPLICATED_REPORT_BYTES and math.prod(dim_shards(spec, leaf.ndim, shape)) == 1:
            replicated.append({"path": f"params/{path}", "shape": list(leaf.shape), "logical": str(lg),
                               "bytes": whole})
        wanted = to_mesh_spec(lg, mesh)
        for i, (w, got) in enumerate(zip(tuple(wanted) + (None,) * leaf.ndim, tuple(spec) + (None,) * leaf.ndim)):
            if i >= leaf.ndim or w == got or w is None:
                continue
            n = dim_shards(jax.sharding.PartitionSpec(w), 1, shape)[0]
            unsplit.append({"path": f"params/{path}", "shape": list(leaf.shape), "dim": i, "size": leaf.shape[i],
                            "wanted": str(w), "got": str(got),
                            "message": f"params/{path}: dim {i} of size {leaf.shape[i]} (shape {tuple(leaf.shape)}) "
                                       f"does not divide into {n} shards on {w}: placed on {got}"})
    return replicated, unsplit


def _drop_batch_axes(entry):
    axes = mesh_axes_of(entry)
    kept = tuple(x for x in axes if x not in BATCH_AXES)
    return kept or None


def _fsdp_gather(params, logical, mesh, a: int) -> float:
    """The largest layer's weights (compute dtype) as its matmuls see them, per device: the batch
    axes (``fsdp``, and ``expert`` on dense leaves) gathered; ``tensor`` and the expert split of
    the ``experts`` dim kept."""
    import jax

    specs = dict(_leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    per_layer: dict[str, float] = {}
    shape = dict(mesh.shape)
    for path, leaf in _leaves(params):
        parts = path.split("/")
        if parts[0].startswith("stack_"):
            key, reps = "/".join(parts[:2]), leaf.shape[0]
        elif parts[0].startswith("mtp_"):
            key, reps = parts[0], 1
        else:
            continue
        lg = tuple(specs[path])
        spec = to_mesh_spec(lg, mesh, shape=leaf.shape)
        kept = [e if n == "experts" else _drop_batch_axes(e) for n, e in zip(lg + (None,) * leaf.ndim, spec)]
        sh = dim_shards(jax.sharding.PartitionSpec(*kept), leaf.ndim, shape)
        per_layer[key] = per_layer.get(key, 0.0) + a * leaf.size / reps / math.prod(sh)
    return 2 * max(per_layer.values(), default=0.0)


def activation_estimate(cfg, remat: str, moe_impl: str, b_local: int, T: int, expert_shards: int,
                        params, logical, mesh, capacity: float | None = None) -> dict:
    import jax.numpy as jnp

    a = jnp.dtype(cfg.dtype).itemsize
    f = 4
    N = b_local * T
    ts = int(mesh.shape.get("tensor", 1))
    n, d, V = cfg.hc_mult, cfg.dim, cfg.vocab_size / ts          # logits split over tensor (vocab)
    layers = [(lt, False) for lt in cfg.layer_types] + [("window", True)] * cfg.n_mtp_layers
    per_type: dict[str, dict] = {}
    saved = {"none": 0.0, "full": 0.0, "save_matmuls": 0.0}
    biggest = 0.0
    rows = 0
    for lt, mtp in layers:
        t = _layer_terms(cfg, lt, N, expert_shards, moe_impl, a, mtp, ts, capacity)
        rows = max(rows, t["moe_routed_rows"])
        key = "mtp" if mtp else lt
        row = per_type.setdefault(key, {"count": 0, **{k: v for k, v in t.items()}})
        row["count"] += 1
        saved["none"] += t["all"]
        saved["full"] += t["stream"]
        saved["save_matmuls"] += t["stream"] + t["matmul"]
        biggest = max(biggest, t["all"])
    heads = 1 + cfg.n_mtp_layers
    head = heads * (2 * N * n * d * f + 2 * N * d * a + N * V * (a + f)) + N * n * d * a   # + embedded X0
    # stream cotangents, one logits cotangent, the routed rows' cotangents of one layer
    working = 2 * N * n * d * f + N * V * f + rows * (d + 2 * cfg.moe_inter_dim / ts) * f
    gather = _fsdp_gather(params, logical, mesh, a)
    extra = head + working + gather
    totals = {"none": saved["none"] + extra,
              "full": saved["full"] + biggest + extra,
              "save_matmuls": saved["save_matmuls"] + biggest + extra}
    totals["offload"] = totals["full"]
    return {"tokens_per_device": N, "b_local": b_local, "seq_len": T, "remat": remat, "moe_impl": moe_impl,
            "expert_shards": expert_shards, "per_layer_type": per_type, "largest_layer": biggest,
            "head": head, "backward_working": working, "fsdp_weight_gather": gather,
            "by_policy": totals, "estimate": totals[remat]}


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_model_trace():
    """``v4jax.params.abstract_variables`` memoised for the duration (``logical_specs``,
    ``abstract_state``, ``state_shardings`` and ``count_params`` each trace the model: on flash
    that is ~9 s a trace, mostly building the hash-routing tables). Same results, one trace."""
    import flax.linen as nn

    orig = vp.abstract_variables
    memo: dict = {}

    def shared(cfg, boxed: bool = False):
        if cfg not in memo:
            memo[cfg] = orig(cfg, boxed=True)
        return memo[cfg] if boxed else nn.meta.unbox(memo[cfg])

    vp.abstract_variables = shared
    try:
        yield
    finally:
        vp.abstract_variables = orig


def resolve_moe(runtime, platform: str = "tpu") -> str:
    """The local expert dispatch a run on ``platform`` uses (``Runtime.moe`` "auto" as
    ``resolve_impl`` would pick it there)."""
    if runtime.moe != "auto":
        return runtime.moe
    if platform == "cpu":
        return "grouped"

    return "tokamax" if tokamax_available() else "ragged"


def make_plan(tc, mesh_axes: dict[str, int], cache_len: int | None = None, cache_batch: int | None = None,
              cache_dtype: str = "bfloat16", cache_format: str = "native", hbm_gib: float = 95.0,
              platform: str = "tpu") -> dict:
    """The whole report for run config ``tc`` (``TrainConfig``: model, optimizer, runtime,
    ``seq_len``, ``batch_size``) on a mesh ``{axis: size}``. Nothing is allocated."""
    with _one_model_trace():
        return _make_plan(tc, mesh_axes, cache_len, cache_batch, cache_dtype, cache_format, hbm_gib, platform)


def _make_plan(tc, mesh_axes, cache_len, cache_batch, cache_dtype, cache_format, hbm_gib, platform) -> dict:
    import jax

    t0 = time.time()
    mesh = abstract_mesh(mesh_axes)
    shape = dict(mesh.shape)
    cfg = tc.model
    logical = logical_specs(cfg)
    problems: list[dict] = []
    # the optimizer exactly as v4jax.train.loop builds it (axes: Muon keeps experts on their devices)

    tx = make_optimizer(tc.optim, abstract_variables(cfg)["params"], logical)
    state = abstract_state(tc, tx)
    sh = state_shardings(cfg, mesh, state)
    parts = {k: tree_bytes(state[k], sh[k], shape, problems, prefix=f"{k}/")
             for k in ("params", "opt_state", "buffers")}
    scalars = tree_bytes({"step": state["step"], "rng": state["rng"]}, {"step": sh["step"], "rng": sh["rng"]}, shape)
    grads = dict(parts["params"])                  # one gradient per parameter, same dtype and sharding
    top = sorted(((shard_bytes(x.shape, x.dtype, _spec_of(s), shape), p, x, _spec_of(s))
                  for (p, x), s in zip(_leaves(state["params"]), jax.tree.leaves(sh["params"]))),
                 key=lambda t: -t[0])[:8]
    top_params = [{"path": p, "shape": list(x.shape), "spec": str(s), "per_device": b} for b, p, x, s in top]
    replicated_large, unsplit = _unsplit_params(state["params"], logical, mesh)
    n_batch = batch_shards(mesh)
    if tc.batch_size % n_batch:
        problems.append({"path": "batch", "size": tc.batch_size, "shards": n_batch,
                         "message": f"batch {tc.batch_size} does not divide into the {n_batch} batch shards "
                                    f"(axes {batch_axes(mesh)})"})
    b_local = -(-tc.batch_size // n_batch)
    moe_impl = resolve_moe(tc.runtime, platform)
    S = int(shape.get("expert", 1))
    act = activation_estimate(cfg, tc.runtime.remat, moe_impl, b_local, tc.seq_len, S, state["params"], logical, mesh,
                              tc.runtime.ep_capacity)
    muon = muon_work(state["params"], logical, mesh, len(tc.optim.muon_ns_coeffs), tc.optim.muon_balance)
    # Muon transient: one leaf at a time (orthogonalize_updates chains them), its owned matrices in
    # and the orthogonalised update out, fp32 NS carry
    big = muon["largest_leaf"]
    muon_transient = 0.0 if big is None else big["transient"]
    batch_bytes = 2 * b_local * (tc.seq_len + 1) * 4          # tokens + segment_ids, int32

    cache = _decode_cache(cfg, mesh, cache_len, cache_batch, cache_dtype, cache_format) if cache_len else None

    state_bytes = parts["params"]["per_device"] + parts["opt_state"]["per_device"] + \
        parts["buffers"]["per_device"] + scalars["per_device"]
    total = state_bytes + grads["per_device"] + batch_bytes + max(act["estimate"], muon_transient)
    pc = count_params(cfg)
    devices = math.prod(shape.values()) if shape else 1
    opt_leaves = [(p, x) for p, x in _leaves(state["opt_state"]) if x.ndim > 0]
    report = {
        "preset": tc.name, "mesh": {a: int(n) for a, n in shape.items()}, "devices": devices,
        "batch_axes": list(batch_axes(mesh)), "batch_shards": n_batch,
        "seq_len": tc.seq_len, "batch": tc.batch_size, "b_local": b_local,
        "dtypes": {"param_dtype": cfg.param_dtype, "compute_dtype": cfg.dtype,
                   "grads": cfg.param_dtype,
                   "opt_state": sorted({str(x.dtype) for _, x in opt_leaves}),
                   "muon_ns_matmul": tc.optim.muon_ns_dtype},
        "runtime": tc.runtime.to_dict(), "moe_dispatch": moe_impl,
        "param_count": {"total": pc.total, "total_with_mtp": pc.total_with_mtp,
                        "leaves_sum": int(sum(x.size for x in jax.tree.leaves(state["params"])))},
        "params": parts["params"], "top_param_leaves": top_params,
        "replicated_params": replicated_large, "unsplit_dims": unsplit, "opt_state": parts["opt_state"], "grads": grads,
        "buffers": parts["buffers"], "step_rng": scalars, "batch_bytes": batch_bytes,
        "activations": act, "muon": {k: v for k, v in muon.items() if k != "rows"},
        "muon_leaves": muon["rows"], "muon_transient": muon_transient,
        "cache": cache, "problems": problems,
        "total_per_device": total, "state_per_device": state_bytes,
        "hbm_gib": hbm_gib, "fits": bool(total <= hbm_gib * GIB) and not problems,
        "analytic_seconds": round(time.time() - t0, 1),
    }
    return report


# ---------------------------------------------------------------------------------------------
# Inference (serving): resident weights, native as released or dequantized to bf16, and the cache
# ---------------------------------------------------------------------------------------------


class Slice(NamedTuple):
    """A named set of accelerators: how many devices and the HBM of each (bytes)."""

    name: str
    devices: int
    hbm_bytes: float
    note: str


# Cloud TPU names a v5p slice by its TensorCores (two per chip): v5p-8 is 2x2x1 = 4 chips, v5p-16
# is 2x2x2 = 8 chips (cloud.google.com/tpu/docs/v5p: "Topology | Cores | Chips": 2x2x1 | 8 | 4).
SLICES: dict[str, Slice] = {s.name: s for s in (
    Slice("v5p-8", 4, 95 * GIB, "Cloud TPU v5p-8: 2x2x1, 4 chips (8 TensorCores), 95 GiB HBM per chip"),
    Slice("v5p-16", 8, 95 * GIB, "Cloud TPU v5p-16: 2x2x2, 8 chips (16 TensorCores), 95 GiB HBM per chip"),
    Slice("8xH100", 8, 80e9, "8 NVIDIA H100 SXM, 80 GB (80e9 bytes) HBM3 each"),
    Slice("8xH200", 8, 141e9, "8 NVIDIA H200, 141 GB (141e9 bytes) HBM3e each"),
)}
WEIGHT_MODES = ("native", "bf16")
# how the released checkpoint stores a leaf (spec 8), in the order the report lists them
STORAGE_KINDS = ("fp4", "fp8", "bf16", "fp32")
STORAGE_LABELS = {"fp4": "routed experts (fp4 in the checkpoint)",
                  "fp8": "attention, shared expert, MTP proj (fp8)",
                  "bf16": "embedding, head, compressors, router (bf16)",
                  "fp32": "mHC, sinks, ape, buffers (fp32 / int32)"}
_FP32_ISLANDS = ("hc_attn/", "hc_ffn/", "hc_head/", "attn_sink", "/ape", "gate/bias")


def storage_kind(path: str) -> str:
    """How the released checkpoint stores the leaf at ``path`` (``"params/stack_2/layer_0/attn/wo_a"``,
    ``"buffers/..."``): ``"fp4"`` / ``"fp8"`` where ``v4jax.layers.quantized.WEIGHT_FORMATS`` says
    so, ``"fp32"`` for the fp32 islands (mHC, attention sinks, ``ape``, the router bias) and every
    buffer (``tid2eid`` is int32: also 4 bytes), ``"bf16"`` for the rest (embedding, head, norms,
    compressors, the indexer's ``weights_proj``, the router)."""
    wf = weight_format(path)
    if wf is not None:
        return wf[0]
    if path.startswith("buffers/") or any(s in path for s in _FP32_ISLANDS):
        return "fp32"
    return "bf16"


def native_weight(shape, fmt: str, layout: str) -> QuantizedWeight:
    """The abstract native weight (``ShapeDtypeStruct`` codes and scales in the checkpoint layout)
    that stands for a dense leaf of v4jax shape ``shape``: fp8 codes ``[..., out, in]`` (1 byte)
    with one e8m0 scale per 128x128 tile (``ceil(out/128) x ceil(in/128)``); fp4 codes packed
    ``[..., out, in/2]`` with one scale per 1x32 block ``[..., out, in/32]``."""
    import jax
    import jax.numpy as jnp

    if layout == "t":
        *lead, inn, out = shape
        groups = 1
    elif layout == "wo_a":
        *lead, groups, inn, dg = shape
        out = groups * dg
    else:
        raise ValueError(f"unknown quantized layout {layout!r}")
    e8m0 = jnp.float8_e8m0fnu
    if fmt == "fp8":
        bo, bi = FP8_BLOCK
        codes = jax.ShapeDtypeStruct((*lead, out, inn), jnp.float8_e4m3fn)
        scale = jax.ShapeDtypeStruct((*lead, -(-out // bo), -(-inn // bi)), e8m0)
    elif fmt == "fp4":
        codes = jax.ShapeDtypeStruct((*lead, out, -(-inn // 2)), jnp.uint8)
        scale = jax.ShapeDtypeStruct((*lead, out, -(-inn // FP4_BLOCK)), e8m0)
    else:
        raise ValueError(f"unknown weight format {fmt!r}")
    return QuantizedWeight(codes, scale, fmt, layout, groups, FP8_BLOCK)


def _leaf_bytes(path: str, leaf, spec, mesh, mode: str, problems: list | None) -> float:
    """Per-device bytes of one variable as served: ``mode="native"`` keeps an fp8 / fp4 leaf as its
    codes and scales (sharded like the dense leaf, ``placement.quantized_sharding``); otherwise a
    float leaf is 2 bytes (bf16), the fp32 islands 4, buffers their own dtype."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    shape = dict(mesh.shape)
    kind = storage_kind(path)
    if mode == "native" and kind in ("fp4", "fp8"):
        nat = native_weight(leaf.shape, *weight_format(path))
        q = quantized_sharding(nat, NamedSharding(mesh, spec))
        return (shard_bytes(nat.codes.shape, nat.codes.dtype, q.codes.spec, shape, f"{path} (codes)", problems)
                + shard_bytes(nat.scale.shape, nat.scale.dtype, q.scale.spec, shape, f"{path} (scales)", problems))
    if path.startswith("buffers/"):
        dtype = leaf.dtype
    else:
        dtype = jnp.float32 if kind == "fp32" else jnp.bfloat16
    return shard_bytes(leaf.shape, dtype, spec, shape, path, problems)


@functools.lru_cache(maxsize=8)
def _served_variables(cfg):
    """``(flat variables {path: ShapeDtypeStruct}, flat logical specs {path: tuple})`` of ``cfg``
    from one model trace (flash: ~9 s, mostly the hash-routing tables), memoised."""
    import flax.linen as nn
    import jax

    boxed = vp.abstract_variables(cfg, boxed=True)
    specs = dict(_leaves(nn.get_partition_spec(boxed)["params"],
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    flat = dict(_leaves(nn.meta.unbox(boxed)))
    return flat, {p: tuple(s) for p, s in specs.items()}


class WeightBytes(NamedTuple):
    """Resident weight bytes of a served model in one mode (``"native"`` or ``"bf16"``)."""

    mode: str
    per_device: float            # parameters + buffers on each device
    total: float                 # all distinct bytes (one copy): for "native", the checkpoint's size
    per_device_by_kind: dict     # STORAGE_KINDS -> per-device bytes
    total_by_kind: dict
    zero_sharded: float          # per-device bytes of leaves whose non-expert dims are split over batch axes
    gather: float                # transient: the largest layer's such leaves gathered, twice (current + next)


class CacheBytes(NamedTuple):
    """The decode cache (``init_cache``) on the mesh (``cache_shardings``)."""

    len: int
    batch: int
    dtype: str
    format: str
    per_device: float
    total: float
    sequences_per_device: float
    split_over_batch_axes: bool
    note: str | None


class InferenceMemory(NamedTuple):
    """Per-device memory of serving ``preset`` on ``mesh``: weights native and dequantized (bf16)
    side by side, the decode cache, and the verdict against ``hbm_bytes`` for each mode.
    ``total_per_device[mode] = weights + gather transient + cache`` (activations not counted)."""

    preset: str
    mesh: dict
    devices: int
    slice: str | None
    hbm_bytes: float | None
    weights: str                 # the mode the verdict (``fits_selected``) is for
    native: WeightBytes
    bf16: WeightBytes
    cache: CacheBytes | None
    batch_axes: tuple
    total_per_device: dict       # mode -> bytes
    fits: dict                   # mode -> bool (None without an HBM size)
    notes: tuple
    problems: tuple              # layouts jit would refuse (dims that do not divide), for ``weights``

    @property
    def fits_selected(self) -> bool | None:
        return self.fits[self.weights]

    def to_dict(self) -> dict:
        d = self._asdict()
        for k in ("native", "bf16", "cache"):
            if d[k] is not None:
                d[k] = d[k]._asdict()
        d["batch_axes"], d["notes"], d["problems"] = list(self.batch_axes), list(self.notes), list(self.problems)
        return d


def _decode_cache(cfg, mesh, cache_len: int, cache_batch: int | None, cache_dtype: str, cache_format: str) -> dict:
    """The decode cache's bytes on ``mesh``: ``cache_batch`` sequences (default: one per batch
    shard) of ``cache_len`` tokens, split over the batch axes when the batch divides them."""
    import jax
    import jax.numpy as jnp

    n_batch = batch_shards(mesh)
    cb = cache_batch or n_batch
    dt = jnp.dtype(cache_dtype)
    ctree = jax.eval_shape(lambda: init_cache(cfg, cb, cache_len, dt, cache_format))
    cb_ = tree_bytes(ctree, cache_shardings(mesh, ctree), dict(mesh.shape))
    split = cb % n_batch == 0
    return {"len": cache_len, "batch": cb, "dtype": cache_dtype, "format": cache_format,
            "split_over_batch_axes": split, "global": cb_["global"], "per_device": cb_["per_device"],
            "sequences_per_device": cb / n_batch if split else cb,
            "note": None if split else f"cache batch {cb} does not divide the {n_batch} batch shards: "
                                       "the cache is replicated on every device"}


def _weight_bytes(flat, specs, mesh, mode: str, problems: list | None) -> WeightBytes:
    per = {k: 0.0 for k in STORAGE_KINDS}
    tot = {k: 0.0 for k in STORAGE_KINDS}
    one = abstract_mesh({})
    zero = 0.0
    layer_gather: dict[str, float] = {}
    for path, leaf in flat.items():
        kind = storage_kind(path)
        if path.startswith("params/"):
            lg = specs[path[len("params/"):]]
            spec = to_mesh_spec(lg, mesh, shape=leaf.shape)
        else:                                           # buffers: replicated (placement.variables_shardings)
            lg, spec = (), PartitionSpec()
        b = _leaf_bytes(path, leaf, spec, mesh, mode, problems)
        per[kind] += b
        tot[kind] += _leaf_bytes(path, leaf, PartitionSpec(), one, mode, None)
        # batch axes (fsdp, and expert on a dense leaf) split the weight ZeRO-style: its matmul
        # gathers it (the experts' own ``experts`` split stays: the tokens travel instead)
        kept = PartitionSpec(*(e if n == "experts" else _drop_batch_axes(e)
                               for n, e in zip(lg + (None,) * leaf.ndim, tuple(spec))))
        if tuple(kept) != tuple(spec):
            zero += b
            parts = path.split("/")
            if parts[1].startswith("stack_"):
                key, reps = "/".join(parts[1:3]), leaf.shape[0]
            elif parts[1].startswith("mtp_"):
                key, reps = parts[1], 1
            else:
                continue                                # embedding / head / final mHC: not per layer
            layer_gather[key] = layer_gather.get(key, 0.0) + _leaf_bytes(path, leaf, kept, mesh, mode, None) / reps
    return WeightBytes(mode, sum(per.values()), sum(tot.values()), per, tot, zero,
                       2 * max(layer_gather.values(), default=0.0))


def _less_split_native(flat, specs, mesh) -> list:
    """Native (fp8 / fp4) leaves whose codes ``placement.quantized_sharding`` splits over fewer
    devices than the dense leaf's sharding: ``(path, extra bytes per device, dense spec, codes spec)``."""
    from jax.sharding import NamedSharding

    shape = dict(mesh.shape)
    out = []
    for path, leaf in flat.items():
        wf = weight_format(path) if path.startswith("params/") else None
        if wf is None:
            continue
        spec = to_mesh_spec(specs[path[7:]], mesh, shape=leaf.shape)
        nat = native_weight(leaf.shape, *wf)
        cspec = quantized_sharding(nat, NamedSharding(mesh, spec)).codes.spec
        dense_n = math.prod(dim_shards(spec, leaf.ndim, shape))
        codes_n = math.prod(dim_shards(cspec, nat.codes.ndim, shape))
        if codes_n < dense_n:
            whole = nbytes_of(nat.codes.shape, nat.codes.dtype)
            out.append((path, whole / codes_n - whole / dense_n, str(spec), str(cspec)))
    return out


def inference_memory(cfg, mesh_shape: dict[str, int] | None = None, weights: str = "native",
                     cache_len: int | None = None, cache_batch: int | None = None,
                     cache_format: str = "native", cache_dtype: str = "bfloat16",
                     slice: str | None = None, hbm_bytes: float | None = None) -> InferenceMemory:
    """Per-device memory of serving ``cfg`` (a ``V4Config`` or a preset name) on a mesh
    ``{axis: size}``: the resident weights as the released checkpoint stores them (``"native"``:
    FP8 codes + 128x128 e8m0 scales, FP4 packed + 1x32 scales, bf16 / fp32 as stored) and
    dequantized (``"bf16"``: every float parameter 2 bytes, fp32 islands 4), both sharded by the
    rules table (``v4jax.sharding``; native codes and scales like the dense leaf they replace,
    ``placement.quantized_sharding``), plus the decode cache of ``cache_batch`` sequences (default
    one per batch shard) of ``cache_len`` tokens (default ``cfg.max_seq_len``; 0: no cache).

    ``slice`` (``SLICES``) gives the HBM per device and, without ``mesh_shape``, the default
    serving mesh ``expert=<devices>``; ``hbm_bytes`` overrides the HBM. ``weights`` picks the mode
    of ``fits_selected``; both modes are always computed. Nothing is allocated."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    if isinstance(cfg, str):
        cfg = model_preset(cfg)
    sl = None
    if slice is not None:
        if slice not in SLICES:
            raise ValueError(f"unknown slice {slice!r} (expected one of {tuple(SLICES)})")
        sl = SLICES[slice]
    if mesh_shape is None:
        mesh_shape = {"expert": sl.devices} if sl is not None and sl.devices > 1 else {}
    mesh_shape = {a: int(n) for a, n in mesh_shape.items()}
    devices = math.prod(mesh_shape.values()) if mesh_shape else 1
    if sl is not None and devices != sl.devices:
        raise ValueError(f"mesh {mesh_shape} has {devices} devices, slice {sl.name} has {sl.devices}")
    if hbm_bytes is None and sl is not None:
        hbm_bytes = sl.hbm_bytes
    mesh = abstract_mesh(mesh_shape)
    flat, specs = _served_variables(cfg)
    problems: dict[str, list] = {m: [] for m in WEIGHT_MODES}
    modes = {m: _weight_bytes(flat, specs, mesh, m, problems[m]) for m in WEIGHT_MODES}
    cache_len = cfg.max_seq_len if cache_len is None else cache_len
    cache = None
    if cache_len:
        c = _decode_cache(cfg, mesh, cache_len, cache_batch, cache_dtype, cache_format)
        cache = CacheBytes(c["len"], c["batch"], c["dtype"], c["format"], c["per_device"], c["global"],
                           c["sequences_per_device"], c["split_over_batch_axes"], c["note"])
    cache_dev = cache.per_device if cache else 0.0
    totals = {m: w.per_device + w.gather + cache_dev for m, w in modes.items()}
    fits = {m: None if hbm_bytes is None else bool(t <= hbm_bytes and not problems[m]) for m, t in totals.items()}
    notes = []
    axes = batch_axes(mesh)
    w = modes[weights]
    if w.zero_sharded:
        notes.append(f"{_gu(w.zero_sharded)} per device of the weights are split over the batch axes "
                     f"{axes} ZeRO-style (the rules table puts a dense leaf's embed / low-rank dim on fsdp x "
                     f"expert, an expert leaf's embed on fsdp): serving all-gathers each layer's share at every "
                     f"forward step ({_gu(w.gather / 2)} per layer, counted twice as a transient); a tensor "
                     f"axis splits heads / mlp / vocab without that gather")
    if devices > 1:
        whole = [p for p, x in flat.items() if p.startswith("params/")
                 and math.prod(dim_shards(to_mesh_spec(specs[p[7:]], mesh, shape=x.shape), x.ndim, mesh_shape)) == 1
                 and _leaf_bytes(p, x, PartitionSpec(), mesh, weights, None) > REPLICATED_REPORT_BYTES]
        if whole:
            notes.append(f"replicated on every device (> {REPLICATED_REPORT_BYTES >> 20} MiB each): "
                         + ", ".join(whole[:6]) + (" ..." if len(whole) > 6 else ""))
    if devices > 1:
        less = _less_split_native(flat, specs, mesh)
        if less:
            notes.append(f"native codes split less than their dense leaf (placement.quantized_sharding), "
                         f"{_gu(sum(x[1] for x in less))} per device more than the dense split would give: "
                         + "; ".join(f"{p} {d} -> codes {c}" for p, _, d, c in less[:3])
                         + (f" (+{len(less) - 3} more)" if len(less) > 3 else ""))
    if cache is not None and cache.note:
        notes.append(cache.note)
    return InferenceMemory(cfg.name, mesh_shape, devices, sl.name if sl else None, hbm_bytes, weights,
                           modes["native"], modes["bf16"], cache, axes, totals, fits, tuple(notes),
                           tuple(problems[weights]))


def serving_meshes(devices: int) -> list[dict[str, int]]:
    """Candidate serving meshes on ``devices`` devices over ``fsdp`` / ``expert`` / ``tensor``
    (every factorisation into powers of two), ``expert=devices`` first."""
    out = []
    for f in range(devices.bit_length()):
        for e in range(devices.bit_length()):
            F, E = 1 << f, 1 << e
            if devices % (F * E):
                continue
            T = devices // (F * E)
            if F * E * T != devices or T & (T - 1):
                continue
            out.append({a: n for a, n in (("fsdp", F), ("expert", E), ("tensor", T)) if n > 1})
    out.sort(key=lambda m: (m != {"expert": devices}, -m.get("expert", 1), m.get("fsdp", 1)))
    return out or [{}]


def format_inference(r: InferenceMemory, title: str = "v4jax-plan --inference") -> str:
    """The inference report as text: one row per storage kind, native and bf16 side by side."""
    mesh = ",".join(f"{a}={n}" for a, n in r.mesh.items()) or "(one device)"
    where = f" on {r.slice}" if r.slice else ""
    hbm = "" if r.hbm_bytes is None else f", {_g(r.hbm_bytes)} GiB HBM each"
    L = [f"{title}: {r.preset}{where} ({r.devices} device{'s' if r.devices > 1 else ''}{hbm}), mesh {mesh}"]
    if r.slice:
        L[0] += f"  [{SLICES[r.slice].note}]"
    L.append(f"{'per device':<58}{'native GiB':>12}{'bf16 GiB':>12}")
    for k in STORAGE_KINDS:
        L.append(f"  {STORAGE_LABELS[k]:<56}{_g(r.native.per_device_by_kind[k]):>12}{_g(r.bf16.per_device_by_kind[k]):>12}")
    L.append(f"{'weights':<58}{_g(r.native.per_device):>12}{_g(r.bf16.per_device):>12}")
    L.append(f"{'  (one copy, all devices together)':<58}{_g(r.native.total):>12}{_g(r.bf16.total):>12}"
             f"   = {r.native.total / 1e9:,.1f} GB / {r.bf16.total / 1e9:,.1f} GB")
    if r.native.gather or r.bf16.gather:
        L.append(f"{'ZeRO gather, largest layer x2 (transient)':<58}{_g(r.native.gather):>12}{_g(r.bf16.gather):>12}")
    c = r.cache
    if c:
        name = f"decode cache ({c.format} {c.dtype}, {c.batch} x {c.len:,} tok, {c.sequences_per_device:g}/dev)"
        L.append(f"{name:<58}{_g(c.per_device):>12}{_g(c.per_device):>12}")
    t = r.total_per_device
    L.append(f"{'TOTAL (weights + gather + cache; no activations)':<58}{_g(t['native']):>12}{_g(t['bf16']):>12}")
    if r.hbm_bytes is not None:
        L.append(f"{'HBM':<58}{_g(r.hbm_bytes):>12}{_g(r.hbm_bytes):>12}")
        L.append(f"{'free':<58}{_g(r.hbm_bytes - t['native']):>12}{_g(r.hbm_bytes - t['bf16']):>12}")
        yn = lambda m: ("yes" if r.fits[m] else "NO") + (" *" if m == r.weights else "")
        L.append(f"{'fits':<58}{yn('native'):>12}{yn('bf16'):>12}")
        L.append(f"verdict (--weights {r.weights}): {'fits' if r.fits_selected else 'DOES NOT FIT'}")
    for n in r.notes:
        L.append(f"note: {n}")
    for p in r.problems[:10]:
        L.append(f"PROBLEM: {p['message']}")
    return "\n".join(L)


def format_mesh_comparison(rows: list[InferenceMemory]) -> str:
    L = [(f"{'mesh':<28}{'native':>9}{'bf16':>9}{'cache':>9}{'total nat':>11}{'total bf16':>11}"
          f"{'fits nat/bf16':>15}{'ZeRO-split':>12}   (GiB per device)")]
    for r in rows:
        mesh = ",".join(f"{a}={n}" for a, n in r.mesh.items()) or "(one device)"
        yn = lambda m, r=r: "-" if r.fits[m] is None else ("yes" if r.fits[m] else "no")
        L.append(f"{mesh:<28}{_g(r.native.per_device):>9}{_g(r.bf16.per_device):>9}"
                 f"{_g(r.cache.per_device if r.cache else 0):>9}{_g(r.total_per_device['native']):>11}"
                 f"{_g(r.total_per_device['bf16']):>11}{yn('native') + ' / ' + yn('bf16'):>15}"
                 f"{_g(r.native.zero_sharded):>12}" + ("  PROBLEMS" if r.problems else ""))
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile: the compiler's memory analysis
# ---------------------------------------------------------------------------------------------


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"= (.*?) (ragged-all-to-all|all-to-all|all-gather|all-reduce|reduce-scatter|"
                         r"collective-permute)(-start)?\(")


def hlo_collectives(hlo: str) -> dict[str, dict]:
    """The collectives of a compiled HLO text by kind: ``{kind: {"count", "bytes"}}``; ``bytes``
    sums the op's result shapes (an async ``-start`` op's tuple holds its operand and its result:
    counted half). A loop body's collectives are counted once, however many times it runs."""
    out: dict[str, dict] = {}
    for m in _COLLECTIVE.finditer(hlo):
        shapes = re.findall(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]", m.group(1))
        size = sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(x) for x in dims.split(",") if x) for t, dims in shapes)
        row = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += size // 2 if m.group(3) else size
    return dict(sorted(out.items()))


def compile_memory(tc, mesh, tx=None, compiler_options: dict | None = None) -> dict:
    """``memory_analysis()`` of the jitted train step (state in ``state_shardings``, batch split
    over the batch axes, state donated) on ``mesh`` (real or compile-only devices)."""
    import jax
    import jax.numpy as jnp

    t0 = time.time()
    if tx is None:
        tx = make_optimizer(tc.optim, abstract_variables(tc.model)["params"], logical_specs(tc.model))
    sh = train_state_shardings(tc, tx, mesh)
    st = abstract_state(tc, tx)
    bsh = batch_sharding(mesh, tc.batch_size)
    args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), st, sh)
    row = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1), jnp.int32, sharding=bsh)
    batch = {"tokens": row, "segment_ids": row}
    step = make_train_step(tc, tx, mesh=mesh, jit=False)
    fn = jax.jit(step, in_shardings=(sh, {"tokens": bsh, "segment_ids": bsh}),
                 out_shardings=(sh, replicated(mesh)), donate_argnums=(0,))
    with mesh_context(mesh):
        lowered = fn.lower(args, batch)
    t1 = time.time()
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    t2 = time.time()
    ma = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
              "host_temp_size_in_bytes", "peak_memory_in_bytes")
    out = {k: int(getattr(ma, k)) for k in fields if hasattr(ma, k) and getattr(ma, k) is not None}
    out["peak_estimate_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                                  - out.get("alias_size_in_bytes", 0) + out.get("temp_size_in_bytes", 0))
    out.update(platform=mesh.devices.flat[0].platform, device_kind=mesh.devices.flat[0].device_kind,
               devices=int(mesh.size), lower_seconds=round(t1 - t0, 1), compile_seconds=round(t2 - t1, 1))
    # XLA's own cost model, per device. It counts a while loop's body once (measured on the
    # Newton-Schulz scan: 10 steps counted as 1), so a scanned layer stack is under-counted.
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    out["cost"] = {k.replace(" ", "_"): float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds")
                   if k in cost}
    out["collectives"] = hlo_collectives(compiled.as_text())
    return out


def aot_memory(tc, mesh, no_crash_on_oom: bool = False) -> dict:
    """``compile_memory``. On TPU a compile that runs out of HBM (``CompileTimeHbmOom``) is not an
    error of the plan: the compiler's message (the HLO temporaries it needs) is returned under
    ``oom``; with ``no_crash_on_oom`` the step is compiled again with libtpu's
    ``xla_tpu_no_crash_on_oom`` so that the whole memory analysis comes back (slow: on flash
    with remat none it did not finish in 20 minutes on 2 CPU cores)."""

    t = time.time()
    try:
        return compile_memory(tc, mesh)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if "CompileTimeHbmOom" not in msg or mesh.devices.flat[0].platform != "tpu":
            raise
        oom = {"message": msg.strip().splitlines()[0][:1000], "seconds": round(time.time() - t, 1)}
        m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", msg)
        if m:
            unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
            oom["temp_required_bytes"] = float(m.group(1)) * unit[m.group(2)]
            oom["hbm_available_bytes"] = float(m.group(3)) * unit[m.group(4)]
    if not no_crash_on_oom:
        d = mesh.devices.flat[0]
        return {"oom": oom, "platform": d.platform, "device_kind": d.device_kind, "devices": int(mesh.size)}
    out = compile_memory(tc, mesh, compiler_options={"xla_tpu_no_crash_on_oom": True})
    out["oom"] = oom
    out["compiler_options"] = {"xla_tpu_no_crash_on_oom": True}
    return out


def topology_mesh(mesh_axes: dict[str, int], libtpu: str, topology: str):
    """A ``Mesh`` over the compile-only devices of TPU ``topology`` (libtpu loaded from the
    folder ``libtpu``, never installed); must run before any other JAX backend use."""
    so = os.path.join(libtpu, "libtpu", "libtpu.so")
    if not os.path.exists(so):
        so = os.path.join(libtpu, "libtpu.so")
    if not os.path.exists(so):
        raise FileNotFoundError(f"no libtpu.so under {libtpu!r} (unpack the libtpu wheel there)")
    os.environ.update(TPU_LIBRARY_PATH=so, TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost")
    import jax
    from jax.experimental import mesh_utils, topologies
    from jax.sharding import Mesh

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    names = tuple(a for a in MESH_AXES if a in mesh_axes)
    shape = tuple(mesh_axes[a] for a in names)
    if math.prod(shape) != len(topo.devices):
        raise ValueError(f"mesh {mesh_axes} has {math.prod(shape)} devices, topology {topology} has "
                         f"{len(topo.devices)}")
    try:
        devs = mesh_utils.create_device_mesh(shape, devices=topo.devices)
    except Exception:  # noqa: BLE001 - an odd shape for the physical topology: plain order
        import numpy as np

        devs = np.asarray(topo.devices).reshape(shape)
    return Mesh(devs, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def local_mesh(mesh_axes: dict[str, int]):
    return make_mesh(mesh_axes)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _g(b) -> str:
    """GiB with two decimals; under 0.01 GiB in MiB (tiny configs)."""
    if 0 < b < 0.01 * GIB:
        return f"{b / 2 ** 20:,.2f} MiB"
    return f"{b / GIB:,.2f}"


def _gu(b) -> str:
    """``_g`` with its unit."""
    text = _g(b)
    return text if text.endswith("MiB") else text + " GiB"


def format_report(r: dict) -> str:
    act = r["activations"]
    L = []
    mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items()) or "(one device)"
    L.append(f"v4jax-plan: {r['preset']} on mesh {mesh} ({r['devices']} devices), seq {r['seq_len']}, "
             f"batch {r['batch']} ({r['b_local']} rows/device over {r['batch_shards']} batch shards "
             f"{tuple(r['batch_axes'])})")
    d = r["dtypes"]
    L.append(f"dtypes: params {d['param_dtype']}, compute {d['compute_dtype']}, grads {d['grads']}, "
             f"optimizer state {'/'.join(d['opt_state'])}, Muon NS matmul {d['muon_ns_matmul']}; "
             f"remat {act['remat']}, MoE dispatch {r['moe_dispatch']}")
    pc = r["param_count"]
    L.append(f"parameters: {pc['total'] / 1e9:.2f}B (+MTP {pc['total_with_mtp'] / 1e9:.2f}B; leaves sum "
             f"{pc['leaves_sum'] / 1e9:.2f}B)")
    L.append("")
    L.append(f"{'per device':<44}{'GiB':>12}{'   global GiB':>14}")
    rows = [("parameters", r["params"]), ("optimizer state (Muon momentum, AdamW mu/nu)", r["opt_state"]),
            ("gradients (= parameters)", r["grads"]), ("buffers (router bias, hash tables)", r["buffers"])]
    for name, x in rows:
        L.append(f"{name:<44}{_g(x['per_device']):>12}{_g(x['global']):>14}")
    L.append(f"{'activations, ESTIMATE (remat ' + act['remat'] + ')':<44}{_g(act['estimate']):>12}")
    pol = act["by_policy"]
    L.append(f"{'   (remat none / save_matmuls / full)':<44}{_g(pol['none']) + ' / ' + _g(pol['save_matmuls']) + ' / ' + _g(pol['full']):>30}")
    L.append(f"{'   of which largest layer (all kept)':<44}{_g(act['largest_layer']):>12}")
    L.append(f"{'   of which heads (logits etc.)':<44}{_g(act['head']):>12}")
    L.append(f"{'   of which fsdp weight gather':<44}{_g(act['fsdp_weight_gather']):>12}")
    m = r["muon"]
    L.append(f"{'Muon transient (largest leaf, in + out)':<44}{_g(r['muon_transient']):>12}")
    L.append(f"{'batch (tokens, segment_ids)':<44}{_g(r['batch_bytes']):>12}")
    L.append(f"{'TOTAL (training step)':<44}{_g(r['total_per_device']):>12}   vs HBM {r['hbm_gib']:g} GiB: "
             f"{'fits' if r['fits'] else 'DOES NOT FIT' if not r['problems'] else 'NOT REALISABLE (see problems)'}")
    L.append("")
    L.append(f"Muon, distributed: Newton-Schulz {m['ns_tflop_per_device']:.2f} TFLOP per device "
             f"({m['ns_balance']:.3f} x total / devices); moved per device and step {_gu(m['moved_per_device'])} "
             f"(to owners {_gu(m['to_owner_per_device'])}, back {_gu(m['back_per_device'])}, tensor-parallel NS "
             f"{_gu(m['ns_collective_per_device'])}); {m['leaves']} leaves, {m['long_side_split']} split along "
             f"their long side")
    if m["largest_leaf"]:
        b = m["largest_leaf"]
        L.append(f"   largest leaf {b['path']} {tuple(b['shape'])}: {b['matrices']} matrices {b['short']}x{b['long']}, "
                 f"{b['owned']} per device over {b['k_axes']}" + (f", long side over {b['l_axes']}" if b["l_axes"] else ""))
    if r.get("top_param_leaves"):
        L.append("largest parameter leaves per device: " + "; ".join(
            f"{t['path']} {t['spec'].replace('PartitionSpec', 'P')} {_g(t['per_device'])}" for t in r["top_param_leaves"][:4]))
    rep = r.get("replicated_params", [])
    L.append(f"replicated parameters above {REPLICATED_REPORT_BYTES >> 20} MiB: "
             + ("none" if not rep else f"{len(rep)}, {_g(sum(t['bytes'] for t in rep))} GiB on every device: " + "; ".join(
                 f"{t['path']} {tuple(t['shape'])} {t['logical']}" for t in rep[:8]) + (" ..." if len(rep) > 8 else "")))
    for u in r.get("unsplit_dims", [])[:8]:
        L.append(f"  note: {u['message']}")
    c = r["cache"]
    if c:
        L.append(f"decode cache ({c['format']} {c['dtype']}, {c['batch']} x {c['len']:,} tokens): "
                 f"{_gu(c['per_device'])} per device ({c['sequences_per_device']:g} sequences/device), "
                 f"{_gu(c['global'])} global" + (f"; {c['note']}" if c["note"] else ""))
    if r["problems"]:
        L.append("")
        L.append(f"PROBLEMS ({len(r['problems'])}): this mesh cannot hold the run as sharded:")
        for p in r["problems"][:20]:
            L.append(f"  - {p['message']}")
        if len(r["problems"]) > 20:
            L.append(f"  ... and {len(r['problems']) - 20} more")
    aot = r.get("aot")
    if aot:
        L.append("")
        if "error" in aot:
            L.append(f"AOT compile: FAILED ({aot.get('where', '')}): {aot['error']}")
        elif "oom" in aot and "argument_size_in_bytes" not in aot:
            o = aot["oom"]
            L.append(f"AOT compile ({aot['device_kind']}, {aot['devices']} devices, {aot.get('topology', 'local')}): "
                     f"DOES NOT FIT, after {o['seconds']} s the compiler reports: {o['message']}")
        else:
            L.append(f"AOT compile ({aot['device_kind']}, {aot['devices']} devices, {aot.get('topology', 'local')}; "
                     f"lower {aot['lower_seconds']} s, compile {aot['compile_seconds']} s), per device:")
            if "oom" in aot:
                L.append(f"   at the real HBM size: {aot['oom']['message']}")
                L.append("   (numbers below: compiled again with xla_tpu_no_crash_on_oom=true)")
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                      "peak_estimate_bytes"):
                if k in aot:
                    L.append(f"   {k:<28}{_g(aot[k]):>10} GiB")
            cost = aot.get("cost") or {}
            if cost:
                L.append("   XLA cost model (a loop body counted once): " + ", ".join(
                    f"{k} {v:.4g}" for k, v in cost.items()))
            if aot.get("collectives"):
                L.append("   collectives in the HLO: " + "; ".join(
                    f"{k} {v['count']} ({_gu(v['bytes'])})" for k, v in aot["collectives"].items()))
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="v4jax-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flash", help="run preset (tiny, small, flash, pro) or a train_config.json")
    ap.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                    help="e.g. fsdp=32,expert=8 (data, fsdp, expert, tensor); required for training, "
                         "--inference with --slice defaults to expert=<devices>")
    ap.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the preset's)")
    ap.add_argument("--batch", type=int, default=None, help="global batch in rows (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="TrainConfig overrides, e.g. runtime.remat=full, model.dtype=float32")
    ap.add_argument("--cache-len", type=int, default=None, help="decode cache length (default: the model's max_seq_len)")
    ap.add_argument("--cache-batch", type=int, default=None, help="decode cache batch (default: one per batch shard)")
    ap.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--cache-format", default="native", choices=["native", "fp8"])
    ap.add_argument("--hbm-gib", type=float, default=95.0, help="HBM per device (v5p: 95)")
    ap.add_argument("--platform", default="tpu", choices=["tpu", "gpu", "cpu"],
                    help="where the run would go: picks Runtime.moe='auto' (tpu/gpu: ragged or tokamax; cpu: blocked)")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--aot", action="store_true", help="also compile the train step and report memory_analysis()")
    ap.add_argument("--libtpu", default=None, help="--aot on a TPU topology: folder of an unpacked libtpu wheel")
    ap.add_argument("--aot-no-crash-on-oom", action="store_true",
                    help="TPU: when the step does not fit, compile again with xla_tpu_no_crash_on_oom for the full "
                         "memory analysis (slow)")
    ap.add_argument("--topology", default=None, help="--aot with --libtpu: e.g. v5p:8x8x4 (256 chips)")
    inf = ap.add_argument_group("inference mode (serving memory: resident weights and the decode cache)")
    inf.add_argument("--inference", action="store_true",
                     help="report serving memory instead of a training step: weights native and bf16 per device, "
                          "the decode cache, the fit verdict")
    inf.add_argument("--weights", default="native", choices=WEIGHT_MODES,
                     help="the mode the verdict is for: native (as the released checkpoint stores them: FP8/FP4 "
                          "with scales) or bf16 (dequantized); both are printed")
    inf.add_argument("--slice", default=None, choices=tuple(SLICES),
                     help="named slice: device count and HBM per device (" + "; ".join(
                         f"{s.name}: {s.devices} x {s.hbm_bytes / GIB:.2f} GiB" for s in SLICES.values()) + ")")
    inf.add_argument("--compare", action="store_true",
                     help="also tabulate every fsdp/expert/tensor mesh on the same devices")
    return ap


def inference_main(args, ap) -> int:
    """``v4jax-plan --inference``: ``inference_memory`` printed (and ``--json``)."""
    if args.aot:
        ap.error("--aot is for training plans (no --inference)")
    axes = None
    if args.mesh is not None:
        try:
            axes = parse_mesh(args.mesh)
        except ConfigError as e:
            ap.error(f"--mesh {args.mesh!r}: {e}")
    elif args.slice is None:
        ap.error("--inference needs --mesh or --slice")
    try:
        cfg = train_preset(args.preset, list(args.set)).model
    except ConfigError as e:
        ap.error(str(e))
    cache_len = args.cache_len if args.cache_len is not None else cfg.max_seq_len
    if not 0 <= cache_len <= cfg.max_seq_len:
        ap.error(f"--cache-len {cache_len}: must be in [0, {cfg.max_seq_len}] (0: no cache)")
    hbm = None if args.slice else args.hbm_gib * GIB
    kw = {"weights": args.weights, "cache_len": cache_len, "cache_batch": args.cache_batch,
          "cache_format": args.cache_format, "cache_dtype": args.cache_dtype, "slice": args.slice, "hbm_bytes": hbm}
    try:
        r = inference_memory(cfg, axes, **kw)
    except ValueError as e:
        ap.error(str(e))
    print(format_inference(r))
    report = r.to_dict()
    if args.compare:
        if r.cache is not None:                     # the same load on every mesh
            kw["cache_batch"] = r.cache.batch
        rows = [inference_memory(cfg, m, **kw) for m in serving_meshes(r.devices)]
        print()
        print(f"every fsdp / expert / tensor mesh on {r.devices} devices"
              + (f", the same cache ({r.cache.batch} x {r.cache.len:,} tokens; split only over the batch axes)"
                 if r.cache is not None else ""))
        print(format_mesh_comparison(rows))
        report["compare"] = [x.to_dict() for x in rows]
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return 3 if r.problems else 0


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.inference:
        return inference_main(args, ap)
    if args.mesh is None:
        ap.error("the following arguments are required: --mesh (or --inference with --slice)")

    try:
        axes = parse_mesh(args.mesh)
    except ConfigError as e:
        ap.error(f"--mesh {args.mesh!r}: {e}")
    if args.libtpu and not args.topology:
        ap.error("--libtpu needs --topology (e.g. v5p:8x8x4)")
    if args.aot and args.libtpu:                      # before any backend starts
        try:
            aot_mesh = topology_mesh(axes, args.libtpu, args.topology)
        except Exception as e:  # noqa: BLE001
            aot_mesh, aot_err = None, f"{type(e).__name__}: {e}"
        else:
            aot_err = None
    elif args.aot:
        import jax

        n = math.prod(axes.values())
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except Exception:  # noqa: BLE001 - backend already started
            pass
        aot_mesh = aot_err = None

    sets = list(args.set)
    if args.seq_len is not None:
        sets.append(f"seq_len={args.seq_len}")
    if args.batch is not None:
        sets.append(f"batch_size={args.batch}")
    if args.aot and args.libtpu and not any(s.startswith("runtime.moe=") for s in sets):
        # "auto" resolves on the host (CPU) at trace time; a TPU run without tokamax uses ragged
        sets.append(f"runtime.moe={resolve_moe(train_preset(args.preset).runtime, 'tpu')}")
    try:
        tc = train_preset(args.preset, sets)
    except ConfigError as e:
        ap.error(str(e))
    cache_len = args.cache_len if args.cache_len is not None else tc.model.max_seq_len
    if not 1 <= cache_len <= tc.model.max_seq_len:
        ap.error(f"--cache-len {cache_len}: must be in [1, {tc.model.max_seq_len}]")
    report = make_plan(tc, axes, cache_len, args.cache_batch, args.cache_dtype, args.cache_format, args.hbm_gib,
                       args.platform)
    if args.aot:
        try:
            if aot_err is not None:
                raise RuntimeError(aot_err)
            mesh = aot_mesh if aot_mesh is not None else local_mesh(axes)
            aot = aot_memory(tc, mesh, args.aot_no_crash_on_oom)
            if args.topology:
                aot["topology"] = args.topology
        except Exception as e:  # noqa: BLE001 - report, keep the analytic numbers
            aot = {"error": f"{type(e).__name__}: {str(e)[:3000]}", "where": args.topology or "local devices"}
        report["aot"] = aot
    text = format_report(report)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return 3 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
