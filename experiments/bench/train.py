"""``benchmarks.py train``: the jitted train step against transformers' eager AdamW step, same weights and ids."""

from __future__ import annotations

import dataclasses
import gc
import os
import shlex
import shutil
import tempfile
import time

import decode_bench as db  # experiments/decode_bench.py
import jax
import jax.numpy as jnp
import numpy as np
import optax

import v4jax
from bench.common import (
    TRAIN_WORKER,
    _plt,
    _save_png,
    banner,
    fmt,
    meta,
    resolved_moe,
    table,
    write_json,
)
from bench.peak import _run_worker, jax_peak
from v4jax.model.layout import unstack_layers
from v4jax.params import abstract_variables
from v4jax.train.config import train_preset
from v4jax.train.optimizer import make_optimizer
from v4jax.train.step import init_state, make_train_step


def model_flops(cfg, with_mtp: bool, moe_impl: str) -> dict:
    """Model FLOPs per trained token = 6 x active parameters per token (forward 2N + backward 4N)."""

    pc = v4jax.count_params(cfg)
    params = unstack_layers(cfg, abstract_variables(cfg)["params"])
    size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
    k, E = cfg.n_activated_experts, cfg.n_routed_experts
    head = size(params["head"])
    mtp_total = mtp_routed = 0
    if cfg.n_mtp_layers:
        mtp = params["mtp_0"]
        mtp_total = size(mtp)
        mtp_routed = size(mtp["ffn"]["experts"])
    mtp_active = (mtp_total - mtp_routed + mtp_routed * k // E + head) if with_mtp else 0
    active = pc.active + mtp_active
    executed = active + ((pc.routed_experts + (mtp_routed if with_mtp else 0)) * (E - k) // E
                         if moe_impl == "dense" else 0)
    return dict(
        formula=("flops_per_token = 6 * n_active, n_active = count_params(cfg).active "
                 "[= total (no MTP) - routed_experts + routed_experts * k / E - embedding; the LM head is "
                 "included, the input embedding lookup is not]"
                 + (" + MTP block (its routed experts scaled by k / E) + LM head again (the MTP block shares "
                    "the head and runs it once more)" if with_mtp else "")
                 + ". Attention score/value products, compressor and indexer scoring are NOT counted "
                   "(6N convention)."),
        n_active=active, n_active_main=pc.active, n_active_mtp=mtp_active,
        total=pc.total, total_with_mtp=pc.total_with_mtp, routed_experts=pc.routed_experts,
        embedding=pc.embedding, head=head, k=k, E=E,
        flops_per_token=6 * active,
        executed_flops_per_token=6 * executed,
        executed_note=("Runtime.moe='dense' runs every routed expert on every token: executed matmul FLOPs "
                       "= 6 * (n_active + routed * (E - k) / E); MFU uses the model FLOPs" if moe_impl == "dense"
                       else "= flops_per_token (this MoE dispatch computes the selected experts only)"),
    )


def _adamw_like_torch(lr: float = 1e-4) -> optax.GradientTransformation:
    """torch.optim.AdamW defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01; every parameter."""
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def _median(xs):
    return sorted(xs)[(len(xs) - 1) // 2]


def time_optimizer(tx, params, opt_state, reps: int) -> dict:
    """``tx.update`` + ``optax.apply_updates`` alone, jitted, on random gradients of the params' shapes."""
    key = jax.random.key(1)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    grads = treedef.unflatten([1e-3 * jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)])

    def upd(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    t = time.perf_counter()
    f = jax.jit(upd).lower(grads, opt_state, params).compile()
    compile_s = time.perf_counter() - t
    for _ in range(2):
        jax.block_until_ready(f(grads, opt_state, params))
    times = []
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        jax.block_until_ready(f(grads, opt_state, params))
        times.append(time.perf_counter() - t)
    return dict(compile_s=compile_s, ms_median=1e3 * _median(times), ms_min=1e3 * min(times), reps=len(times))


def bench_v4jax_train(preset: str, batch: int, seq: int, optimizer: str, mtp: bool, moe: str | None,
                      steps: int, warmup: int, stage: str, seed: int, ckpt_dir: str | None,
                      opt_reps: int, lr: float) -> tuple[dict, np.ndarray]:
    """The library's jitted train step; returns (result, tokens [B, T+1]). Saves the initial
    weights to ``ckpt_dir`` (official naming) before training when given."""

    tc = train_preset(preset)
    mcfg = tc.model if mtp else tc.model.replace(n_mtp_layers=0)
    if seq + 1 > mcfg.max_seq_len:
        mcfg = mcfg.replace(max_seq_len=seq + 1)
    runtime = tc.runtime if moe is None else tc.runtime.replace(moe=moe)
    tc = dataclasses.replace(tc, model=mcfg, runtime=runtime, seq_len=seq, batch_size=batch, seed=seed)

    t = time.perf_counter()
    model = v4jax.V4Model.init(tc.model, seed=seed, runtime=runtime)
    jax.block_until_ready(model.variables)
    init_s = time.perf_counter() - t
    save_s = None
    if ckpt_dir:
        t = time.perf_counter()
        model.save(ckpt_dir)
        save_s = time.perf_counter() - t
    if optimizer == "adamw":
        tx = _adamw_like_torch(lr)
        opt_desc = f"optax.adamw(lr={lr}, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01) on every parameter, no clipping"
    else:
        tx = make_optimizer(tc.optim, model.params)
        opt_desc = (f"v4jax.train.optimizer.make_optimizer(train_preset({preset!r}).optim): clip {tc.optim.clip}, "
                    f"Muon (ns {tc.optim.muon_ns_dtype}, bucket {tc.optim.muon_bucket}) + AdamW by PARAM_RULES")
    # the step donates its state: give it its own copy of the weights
    state = init_state(tc, tx, jax.tree.map(jnp.array, model.variables))
    del model
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, tc.model.vocab_size, (batch, seq + 1)).astype(np.int32)
    batch_d = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones((batch, seq + 1), jnp.int32)}

    step_fn = make_train_step(tc, tx, stage=None if stage == "follow" else stage)
    t = time.perf_counter()
    no_limit = jnp.float32(jnp.inf)  # loss_limit: no spike guard while timing
    lowered = step_fn.lower(state, batch_d, no_limit)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t

    step_s, metrics = [], []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        state, m = compiled(state, batch_d, no_limit)
        jax.block_until_ready((state, m))
        step_s.append(time.perf_counter() - t)
        metrics.append(m)
    metrics = [{k: float(v) for k, v in m.items()} for m in metrics]
    timed = step_s[warmup:]
    total = sum(timed)
    tok_s = batch * seq * len(timed) / total
    res = dict(
        ok=True, preset=preset, batch=batch, seq=seq, optimizer=optimizer, optimizer_desc=opt_desc,
        mtp=mtp, n_mtp_layers=tc.model.n_mtp_layers, runtime=runtime.to_dict(), moe_resolved=resolved_moe(runtime.moe),
        stage=stage, stages_seen=sorted({int(m["stage"]) for m in metrics}), steps=steps, warmup=warmup,
        init_s=init_s, save_s=save_s, lower_s=lower_s, compile_s=lower_s + compile_s, xla_compile_s=compile_s,
        first_step_s=step_s[0], timed_s=total, tokens_per_s=tok_s,
        step_ms_median=1e3 * _median(timed), step_ms_min=1e3 * min(timed), step_ms_all=[1e3 * s for s in timed],
        first_loss=metrics[0]["loss"], final_loss=metrics[-1]["loss"],
        first_lm_loss=metrics[0]["lm_loss"], final_lm_loss=metrics[-1]["lm_loss"],
        skipped_steps=int(sum(m["skipped"] for m in metrics)),
        losses=[m["loss"] for m in metrics], lm_losses=[m["lm_loss"] for m in metrics],
        peak_rss_gb=db.peak_rss_gb(),
    )
    if opt_reps > 0:
        ot = time_optimizer(tx, state["params"], state["opt_state"], opt_reps)
        ot["fraction_of_step"] = ot["ms_median"] / res["step_ms_median"]
        res["optimizer_update"] = ot
    del state, compiled, lowered, batch_d
    gc.collect()
    return res, tokens


def bench_hf_train(torch_python: str, ckpt: str, tokens: np.ndarray, steps: int, warmup: int, lr: float,
                   workdir: str, timeout: float) -> dict:
    path = os.path.join(workdir, f"tokens_{tokens.shape[0]}x{tokens.shape[1]}.npy")
    np.save(path, tokens)
    cmd = [torch_python, TRAIN_WORKER, "--ckpt", ckpt, "--tokens", path, "--steps", str(steps),
           "--warmup", str(warmup), "--lr", str(lr), "--threads", str(os.cpu_count() or 1)]
    res = _run_worker(cmd, timeout, "transformers train worker")
    res["command"] = " ".join(shlex.quote(c) for c in cmd)
    return res


def train_one(args, preset: str, optimizer: str, mtp: bool, peak: dict, hf_cache: dict | None = None) -> dict:
    """One train configuration, both sides; writes train_<preset>_<opt>_mtp<on|off>_b<B>_s<T>.json/.png."""
    name = f"train_{preset}_{optimizer}_mtp{'on' if mtp else 'off'}_b{args.batch}_s{args.seq}"
    load = banner(name)
    have_hf, hf_note = db.probe_torch(args.torch_python) if args.torch_python else (False, "no --torch-python")
    print(f"transformers side: {hf_note if have_hf else 'SKIPPED - ' + hf_note}", flush=True)
    hf_key = (preset, args.batch, args.seq, args.steps, args.warmup, args.seed, args.lr)
    need_hf = have_hf and not (hf_cache is not None and hf_key in hf_cache)
    workdir = tempfile.mkdtemp(prefix="bench_train_")
    try:
        ckpt = os.path.join(workdir, "ckpt") if need_hf else None
        jx, tokens = bench_v4jax_train(preset, args.batch, args.seq, optimizer, mtp, args.moe, args.steps, args.warmup,
                                       args.stage, args.seed, ckpt, args.opt_reps, args.lr)
        print(f"v4jax: compile {jx['compile_s']:.1f}s, first step {jx['first_step_s']:.2f}s, "
              f"median step {jx['step_ms_median']:.0f} ms, {jx['tokens_per_s']:.0f} tok/s, "
              f"loss {jx['first_loss']:.4f} -> {jx['final_loss']:.4f}", flush=True)
        hf, hf_from = None, None
        if have_hf:
            if need_hf:
                hf = bench_hf_train(args.torch_python, ckpt, tokens[:, :-1], args.steps, args.warmup, args.lr,
                                    workdir, args.hf_timeout)
                if hf_cache is not None and hf.get("ok"):
                    hf_cache[hf_key] = (hf, name)
            else:
                hf, hf_from = hf_cache[hf_key]
                print(f"transformers: reusing the run of {hf_from} (same preset, batch, seq, steps; "
                      f"transformers has no MTP and always uses AdamW)")
            if hf.get("ok"):
                print(f"transformers: load {hf['load_s']:.1f}s, first step {hf['first_step_s']:.2f}s, median step "
                      f"{hf['step_ms_median']:.0f} ms, {hf['tokens_per_s']:.0f} tok/s, loss {hf['first_loss']:.4f} -> "
                      f"{hf['final_loss']:.4f}, missing/unexpected keys {len(hf['missing_keys'])}/"
                      f"{len(hf['unexpected_keys'])}", flush=True)
            else:
                print(f"transformers: FAILED - {hf['error']}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    fl = model_flops(v4jax.preset(preset) if mtp else v4jax.preset(preset, n_mtp_layers=0), mtp, jx["moe_resolved"])
    peak_flops = peak["gflops"] * 1e9
    jx["model_tflops_per_s"] = jx["tokens_per_s"] * fl["flops_per_token"] / 1e12
    jx["mfu"] = jx["tokens_per_s"] * fl["flops_per_token"] / peak_flops
    jx["executed_flops_fraction_of_peak"] = jx["tokens_per_s"] * fl["executed_flops_per_token"] / peak_flops
    hf_ok = hf is not None and hf.get("ok")
    if hf_ok:
        hf_fl = fl if not mtp else model_flops(v4jax.preset(preset, n_mtp_layers=0), False, "ragged")
        hf["flops_per_token"] = hf_fl["flops_per_token"]
        hf["mfu"] = hf["tokens_per_s"] * hf_fl["flops_per_token"] / peak_flops
    ratio = jx["tokens_per_s"] / hf["tokens_per_s"] if hf_ok else None
    fair = optimizer == "adamw" and not mtp

    rows = [["v4jax", f"{jx['tokens_per_s']:.0f}", f"{jx['step_ms_median']:.0f}", f"{jx['compile_s']:.1f}",
             f"{100 * jx['mfu']:.2f}%", f"{jx['first_lm_loss']:.4f} / {jx['final_lm_loss']:.4f}"]]
    if hf is not None:
        rows.append(["transformers" + (f" (from {hf_from})" if hf_from else ""),
                     f"{hf['tokens_per_s']:.0f}" if hf_ok else "failed", fmt(hf.get("step_ms_median"), ".0f"), "-",
                     f"{100 * hf['mfu']:.2f}%" if hf_ok else "-",
                     f"{hf['first_loss']:.4f} / {hf['final_loss']:.4f}" if hf_ok else "-"])
    print(f"\n{preset}, B={args.batch}, T={args.seq}, {optimizer}, MTP {'on' if mtp else 'off'}, "
          f"moe={jx['runtime']['moe']} ({jx['moe_resolved']}), stage={args.stage}; {args.steps} timed steps after {args.warmup} warm-up; "
          f"jax peak {peak['gflops']:.1f} GFLOP/s, {fl['flops_per_token'] / 1e6:.1f} MFLOP/token "
          f"(n_active {fl['n_active'] / 1e6:.2f}M)")
    table(["side", "tokens/s", "median step ms", "compile s", "MFU (vs jax peak)", "loss first / last (LM)"], rows)
    if "optimizer_update" in jx:
        ot = jx["optimizer_update"]
        print(f"optimizer update alone ({optimizer}): {ot['ms_median']:.1f} ms median = "
              f"{100 * ot['fraction_of_step']:.1f}% of the step")
    if ratio is not None:
        print(f"ratio v4jax / transformers tokens/s: {ratio:.2f}x"
              + ("" if fair else "  (NOT like for like: transformers has no MTP and uses AdamW)"))

    res = {**meta(load), "kind": "train", "name": name, "peak": peak, "flops": fl, "v4jax": jx,
           "transformers": hf, "transformers_reused_from": hf_from,
           "transformers_note": None if hf is not None else hf_note,
           "ratio_tokens_per_s": ratio, "like_for_like": fair,
           "notes": ("tokens = B * T per step; v4jax trains on tokens[:, :T] -> tokens[:, 1:] (T targets), "
                     "transformers on input_ids = tokens[:, :T] with labels = input_ids (T - 1 targets), the same "
                     "forward length. v4jax's loss includes the balance term and (stage sparse) the indexer KL; "
                     "lm_loss is the comparable number.")}
    write_json(args.out, name, res)
    if not args.no_plot:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5, 4))
        labels = ["v4jax", "transformers"]
        vals = [jx["tokens_per_s"], hf["tokens_per_s"] if hf_ok else None]
        bars = ax.bar(labels, [v or 0 for v in vals], color=["tab:blue", "tab:orange"])
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom")
        ax.set_ylabel("train tokens/s")
        ax.set_title(f"{preset} B={args.batch} T={args.seq} {optimizer} MTP {'on' if mtp else 'off'}"
                     + (f"\nratio {ratio:.2f}x" if ratio else ""), fontsize=9)
        _save_png(plt, fig, args.out, name)
    return res


def cmd_train(args, peak: dict | None = None) -> dict:
    peak = peak or jax_peak(args.peak_n, args.peak_reps)
    return train_one(args, args.preset, args.optimizer, args.mtp == "on", peak)
