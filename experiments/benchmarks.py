"""One entry point for the v4jax benchmarks (CPU, fp32), each against Hugging Face transformers'
``DeepseekV4ForCausalLM`` on the SAME random weights where a comparison makes sense.

    PY=.venv/bin/python
    $PY experiments/benchmarks.py peak                                  # fp32 matmul peak, jax (+ torch)
    $PY experiments/benchmarks.py train                                 # tiny, 8 x 256, adamw, MTP off, 10 steps
    $PY experiments/benchmarks.py train --preset small --batch 8 --seq 256 --steps 10
    $PY experiments/benchmarks.py train --optimizer muon --mtp on       # the V4 recipe (Muon + AdamW, MTP)
    $PY experiments/benchmarks.py train --moe ragged --torch-python ''  # v4jax only, ragged MoE
    $PY experiments/benchmarks.py decode --contexts 1024 4096 --new-tokens 16 --batch 1 8
    $PY experiments/benchmarks.py long-context --quick                  # -> experiments/long_context_bench.py
    $PY experiments/benchmarks.py compile --layers 6 43                 # -> experiments/compile_bench.py
    $PY experiments/benchmarks.py all [--with-long]                     # everything below, all.json
    $PY experiments/benchmarks.py --out /tmp/b train --batch 2 --seq 64 --steps 2   # smoke test

Subcommands (each writes ``<out>/<name>.json`` (+ a PNG) with host info, versions, command and date;
``--out`` defaults to ``experiments/results/benchmarks/``):

* ``peak``: fp32 matmul peak: jitted ``jnp.dot`` of two random ``[n, n]`` (n = 2048) matrices, warm,
  best of ``--peak-reps``; GFLOP/s = 2 n^3 / t. With a working ``--torch-python``, the same in torch
  (``_hf_train_worker.py --peak``). Every other subcommand measures the jax peak first, in the same
  process, and reports MFU = model FLOP/s / jax peak.
* ``train``: the library's jitted train step (``v4jax.train.step.make_train_step`` on the
  ``train_preset(--preset)`` config with ``seq_len``/``batch_size`` replaced) on random ids
  ``tokens [B, T+1]``, ``segment_ids`` all ones. Compiled ahead of time (``lower().compile()``:
  the compile time), ``--warmup`` untimed steps, then ``--steps`` timed ones, each ended by
  ``jax.block_until_ready``. tokens/s = B T steps / time. ``--optimizer adamw``: ``optax.adamw``
  on every parameter with torch's ``AdamW`` defaults (lr 1e-4, betas (0.9, 0.999), eps 1e-8,
  weight decay 0.01, no clipping), like the transformers side; ``muon``: the V4 recipe
  ``make_optimizer(train_preset(...).optim, params)`` (clip + Muon for matrices + AdamW for the
  rest); its update alone (``tx.update`` + ``optax.apply_updates``, jitted separately, on random
  gradients of the parameters' shapes) is timed too and given as a share of the step (also for
  adamw). ``--mtp off`` = ``V4Config.n_mtp_layers = 0`` (no MTP block at all). ``--stage``: the
  curriculum stage the step is pinned to (default ``sparse``, the stage most of a run spends in;
  ``follow`` = the step counter decides, i.e. the preset's dense stage for a short benchmark).
  Then (never at the same time) the transformers side on the same initial weights
  (``V4Model.save``) and the same ids (``input_ids = tokens[:, :T]``, ``labels = input_ids``):
  ``_hf_train_worker.py`` with ``torch.optim.AdamW``. transformers has no MTP, so the fair
  comparison is ``--optimizer adamw --mtp off`` (the default).
  Model FLOPs/token = 6 N_active (see ``flops`` in the JSON for the exact formula).
* ``decode``: ``experiments/decode_bench.py``'s functions (``bench_v4jax``, ``bench_hf``,
  ``probe_torch``, ``agreement``) over several contexts and batch sizes, tiny preset, greedy.
* ``long-context`` / ``compile``: run ``experiments/long_context_bench.py`` /
  ``experiments/compile_bench.py`` as subprocesses; everything after the subcommand is passed
  through unchanged (their ``--out`` defaults to ``<out>/long_context/`` and
  ``<out>/compile/compile.json`` unless given); their JSON is embedded in ``<out>/long_context.json``
  / ``<out>/compile.json``. Options of this script must come BEFORE these two subcommands
  (``benchmarks.py --out DIR compile --layers 6``).
* ``all``: peak; train tiny adamw/MTP off, tiny muon/MTP on, small adamw/MTP off (the
  transformers side once per preset: it has no MTP and always uses AdamW, so the muon row reuses
  the adamw row's transformers run); decode at 1K and 4K, B = 1 and 8; ``--with-long`` adds
  long-context and compile. Writes every part's JSON and ``all.json`` / ``all.png`` (summary).

The two sides run one after the other in the same invocation, never concurrently; anything else
running on the machine skews both (the load average at start is recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import decode_bench as db  # noqa: E402  (experiments/decode_bench.py)
import v4jax  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "benchmarks")
HF_PY = "/work/hfvenv/bin/python"
DEFAULT_TORCH_PYTHON = HF_PY if os.path.exists(HF_PY) else ""
TRAIN_WORKER = os.path.join(HERE, "_hf_train_worker.py")
LONG_SCRIPT = os.path.join(HERE, "long_context_bench.py")
COMPILE_SCRIPT = os.path.join(HERE, "compile_bench.py")
PASSTHROUGH = ("long-context", "compile")
try:
    from v4jax.runtime import MOE_IMPLS
except ImportError:  # older library
    MOE_IMPLS = ("ragged", "dense")


def resolved_moe(impl: str) -> str:
    """The MoE dispatch ``Runtime.moe`` actually runs (``"auto"`` depends on the backend)."""
    try:
        from v4jax.moe.experts import resolve_impl
    except ImportError:
        return impl
    try:
        return resolve_impl(impl)
    except Exception as e:  # noqa: BLE001
        return f"{impl} ({e})"

_START = {"load_avg": db.load_avg(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------------------------
# Host info, JSON, printing
# ----------------------------------------------------------------------------------------------

def _pkg(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_cpu_model = db.cpu_model


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def command_line() -> str:
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable
    return " ".join([exe, os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + [shlex.quote(a) for a in sys.argv[1:]])


def meta(bench_start_load: str | None = None) -> dict:
    """Host info, versions, command line and date for every JSON this script writes."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "started": _START["date"],
        "command": command_line(),
        "host": {"node": platform.node(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                 "load_avg_at_start": _START["load_avg"],
                 "load_avg_at_bench_start": bench_start_load or _START["load_avg"],
                 "load_avg_at_write": db.load_avg(), "mem_total_gb": _mem_total_gb(),
                 "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"v4jax": v4jax.__version__, "jax": jax.__version__, "jaxlib": _pkg("jaxlib"),
                     "flax": _pkg("flax"), "optax": _pkg("optax"), "numpy": np.__version__},
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _show(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def write_json(out: str, name: str, payload: dict) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=1)
    print(f"wrote {_show(path)}")
    return path


def fmt(x, spec=".1f", missing="-"):
    return missing if x is None else format(x, spec)


def table(headers: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---:" for _ in headers) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, labels, series: dict[str, list], ylabel: str, log: bool = False) -> None:
    """Grouped bars: one group per label, one bar per series (None = missing)."""
    n = len(series)
    w = 0.8 / max(n, 1)
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        v = [0.0 if a is None else a for a in vals]
        bars = ax.bar(x + (i - (n - 1) / 2) * w, v, w, label=name)
        for b, a in zip(bars, vals):
            ax.annotate("n/a" if a is None else f"{a:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _save_png(plt, fig, out: str, name: str) -> None:
    fig.tight_layout()
    p = os.path.join(out, f"{name}.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    print(f"wrote {_show(p)}")


def banner(title: str) -> str:
    load = db.load_avg()
    print(f"\n=== {title} ===  {platform.node()}  {_cpu_model()}, {os.cpu_count()} CPUs, load avg {load}; "
          f"v4jax {v4jax.__version__}, jax {jax.__version__}", flush=True)
    return load


# ----------------------------------------------------------------------------------------------
# Peak
# ----------------------------------------------------------------------------------------------

def jax_peak(n: int = 2048, reps: int = 10) -> dict:
    """fp32 matmul peak: jitted ``jnp.dot`` of two random ``[n, n]``, warm, best of ``reps``."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32)
    b = jax.random.normal(k2, (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    for _ in range(2):
        f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    best = min(times)
    med = sorted(times)[(reps - 1) // 2]
    return dict(ok=True, n=n, reps=reps, best_s=best, median_s=med, gflops=2 * n**3 / best / 1e9,
                gflops_median=2 * n**3 / med / 1e9, dtype="float32", precision="default")


_run_worker = db.run_worker


def torch_peak(torch_python: str, n: int, reps: int, timeout: float = 600) -> dict:
    ok, note = db.probe_torch(torch_python)
    if not ok:
        return dict(ok=False, error=note)
    cmd = [torch_python, TRAIN_WORKER, "--peak", "--n", str(n), "--reps", str(reps),
           "--threads", str(os.cpu_count() or 1)]
    return _run_worker(cmd, timeout, "torch peak worker")


def print_peak(jp: dict, tp: dict | None) -> None:
    rows = [["jax (jnp.dot, jit)", jp["n"], f"{jp['best_s'] * 1e3:.1f}", f"{jp['gflops']:.1f}", f"{jp['gflops_median']:.1f}"]]
    if tp is not None:
        if tp.get("ok"):
            rows.append([f"torch {tp['versions']['torch']} (matmul, {tp['threads']} threads)", tp["n"],
                         f"{tp['best_s'] * 1e3:.1f}", f"{tp['gflops']:.1f}", f"{tp['gflops_median']:.1f}"])
        else:
            rows.append(["torch", "-", "-", "failed", tp.get("error", "")[:80]])
    table(["fp32 matmul", "n", "best ms", "GFLOP/s (best)", "GFLOP/s (median)"], rows)


def cmd_peak(args) -> dict:
    load = banner("peak")
    jp = jax_peak(args.peak_n, args.peak_reps)
    tp = torch_peak(args.torch_python, args.peak_n, args.peak_reps) if args.torch_python else None
    print_peak(jp, tp)
    res = {**meta(load), "kind": "peak", "jax": jp, "torch": tp,
           "torch_over_jax": (tp["gflops"] / jp["gflops"]) if tp and tp.get("ok") else None}
    write_json(args.out, "peak", res)
    return res


# ----------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------

def model_flops(cfg, with_mtp: bool, moe_impl: str) -> dict:
    """Model FLOPs per trained token = 6 x active parameters per token (forward 2N + backward 4N)."""
    from v4jax.model.layout import unstack_layers
    from v4jax.params import abstract_variables

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
    from v4jax.train.config import train_preset
    from v4jax.train.optimizer import make_optimizer
    from v4jax.train.step import init_state, make_train_step

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
    lowered = step_fn.lower(state, batch_d)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t

    step_s, metrics = [], []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        state, m = compiled(state, batch_d)
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


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------

def cmd_decode(args, peak: dict | None = None) -> dict:
    load = banner("decode")
    peak = peak or jax_peak(args.peak_n, args.peak_reps)
    have_hf, hf_note = db.probe_torch(args.torch_python)
    print(f"transformers side: {hf_note if have_hf else 'SKIPPED - ' + hf_note}", flush=True)
    N = args.new_tokens
    cfg = v4jax.preset("tiny", max_seq_len=max(args.contexts) + N)
    t = time.perf_counter()
    model = v4jax.V4Model.init(cfg, seed=args.seed)
    jax.block_until_ready(model.variables)
    print(f"model: {model}, max_seq_len {cfg.max_seq_len}, runtime {model.runtime}; init {time.perf_counter() - t:.1f}s; "
          f"{N} new tokens (1 warm-up + {N - 1} timed), greedy", flush=True)
    n_active = v4jax.count_params(cfg).active
    rows = []
    workdir = tempfile.mkdtemp(prefix="bench_decode_")
    try:
        ckpt = os.path.join(workdir, "ckpt")
        model.save(ckpt)
        rng = np.random.default_rng(args.seed)
        for B in args.batch:
            for C in args.contexts:
                prompt = rng.integers(0, cfg.vocab_size, (B, C)).astype(np.int32)
                jx = db.bench_v4jax(model, prompt, N)
                jx["mfu"] = jx["tok_s"] * 2 * n_active / (peak["gflops"] * 1e9)
                print(f"[B={B} C={C}] v4jax: prefill {jx['prefill_s']:.2f}s (+{jx['prefill_compile_s']:.1f}s compile), "
                      f"{jx['step_ms_median']:.1f} ms/step, {jx['tok_s']:.1f} tok/s", flush=True)
                hf = None
                if have_hf:
                    hf = db.bench_hf(args.torch_python, ckpt, prompt, N, workdir, args.hf_timeout)
                    if hf["ok"]:
                        print(f"[B={B} C={C}] transformers: prefill {hf['prefill_s']:.2f}s, "
                              f"{hf['step_ms_median']:.1f} ms/step, {hf['tok_s']:.1f} tok/s", flush=True)
                    else:
                        print(f"[B={B} C={C}] transformers: FAILED - {hf['error']}", flush=True)
                ok = hf is not None and hf["ok"]
                agree = (db.agreement(jx["tokens"], hf["tokens"])
                         if ok and hf["tokens"].shape == jx["tokens"].shape else None)
                jx.pop("tokens")
                if hf is not None:
                    hf.pop("tokens", None)
                rows.append(dict(batch=B, context=C, v4jax=jx, transformers=hf,
                                 ratio_tok_s=jx["tok_s"] / hf["tok_s"] if ok else None,
                                 ratio_prefill=hf["prefill_s"] / jx["prefill_s"] if ok else None,
                                 greedy_agreement=agree))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    del model
    gc.collect()

    print()
    table(["B", "context", "v4jax tok/s", "transformers tok/s", "ratio", "v4jax prefill s", "transformers prefill s",
           "v4jax ms/step", "transformers ms/step", "greedy agreement"],
          [[r["batch"], r["context"], f"{r['v4jax']['tok_s']:.1f}",
            fmt(r["transformers"]["tok_s"]) if r["transformers"] and r["transformers"]["ok"]
            else ("skipped" if r["transformers"] is None else "failed"),
            fmt(r["ratio_tok_s"], ".2f"), f"{r['v4jax']['prefill_s']:.2f}",
            fmt(r["transformers"].get("prefill_s") if r["transformers"] else None, ".2f"),
            f"{r['v4jax']['step_ms_median']:.1f}",
            fmt(r["transformers"].get("step_ms_median") if r["transformers"] else None),
            r["greedy_agreement"] or "-"] for r in rows])
    for r in rows:
        if r["transformers"] is not None and not r["transformers"]["ok"]:
            print(f"transformers at B={r['batch']} C={r['context']}: {r['transformers']['error']}")
    res = {**meta(load), "kind": "decode", "preset": "tiny", "new_tokens": N, "contexts": args.contexts,
           "batches": args.batch, "peak": peak, "n_active": n_active,
           "mfu_note": "decode MFU = tok/s * 2 * n_active / jax peak (attention over the cache not counted)",
           "transformers_note": hf_note, "method": "experiments/decode_bench.py (bench_v4jax, bench_hf)",
           "rows": rows}
    write_json(args.out, "decode", res)
    if not args.no_plot and rows:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
        _bars(ax, [f"B={r['batch']}\nC={r['context']}" for r in rows],
              {"v4jax": [r["v4jax"]["tok_s"] for r in rows],
               "transformers": [r["transformers"]["tok_s"] if r["transformers"] and r["transformers"]["ok"] else None
                                for r in rows]}, "decode tokens/s", log=True)
        ax.set_title(f"tiny greedy decode, {N - 1} timed steps", fontsize=9)
        _save_png(plt, fig, args.out, "decode")
    return res


# ----------------------------------------------------------------------------------------------
# Pass-through: long-context, compile
# ----------------------------------------------------------------------------------------------

def _has_opt(argv: list[str], opt: str) -> bool:
    return any(a == opt or a.startswith(opt + "=") for a in argv)


def _opt_value(argv: list[str], opt: str) -> str | None:
    for i, a in enumerate(argv):
        if a == opt and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(opt + "="):
            return a.split("=", 1)[1]
    return None


def run_passthrough(out: str, which: str, extra: list[str], timeout: float | None = None) -> dict:
    load = banner(which)
    script = LONG_SCRIPT if which == "long-context" else COMPILE_SCRIPT
    argv = list(extra)
    help_only = _has_opt(argv, "-h") or _has_opt(argv, "--help")
    if not _has_opt(argv, "--out") and not help_only:
        argv += ["--out", os.path.join(out, "long_context") if which == "long-context"
                 else os.path.join(out, "compile", "compile.json")]
    cmd = [sys.executable, script] + argv
    print("running:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    wall = time.time() - t0
    if help_only:
        return {"rc": rc}
    stdout_json = []
    for ln in lines:
        s = ln.strip()
        if s.startswith("{") and s.endswith("}"):
            try:
                stdout_json.append(json.loads(s))
            except ValueError:
                pass
    # where the child wrote its JSON
    target = _opt_value(argv, "--out")
    files = []
    if target:
        cands = ([os.path.join(target, f) for f in os.listdir(target) if f.endswith(".json")]
                 if os.path.isdir(target) else [target])
        files = [f for f in cands if os.path.isfile(f) and os.path.getmtime(f) >= t0 - 1]
    child = {}
    for f in files:
        try:
            with open(f) as fh:
                child[_show(f)] = json.load(fh)
        except (OSError, ValueError):
            pass
    name = "long_context" if which == "long-context" else "compile"
    res = {**meta(load), "kind": name, "child_command": " ".join(shlex.quote(c) for c in cmd), "rc": rc,
           "wall_s": wall, "child_json_files": sorted(child), "child_json": child, "stdout_json": stdout_json,
           "stdout_tail": lines[-60:]}
    print(f"{which}: exit code {rc}, wall {wall:.0f}s, JSON: {sorted(child) or '(none written; see stdout_json)'}")
    write_json(out, name, res)
    return res


# ----------------------------------------------------------------------------------------------
# All
# ----------------------------------------------------------------------------------------------

def cmd_all(args) -> dict:
    t_all = time.perf_counter()
    peak_res = cmd_peak(args)
    peak = peak_res["jax"]
    hf_cache: dict = {}
    trains = []
    for preset, opt, mtp in (("tiny", "adamw", False), ("tiny", "muon", True), ("small", "adamw", False)):
        trains.append(train_one(args, preset, opt, mtp, peak, hf_cache))
    dec_args = argparse.Namespace(**{**vars(args), "contexts": args.contexts, "batch": args.decode_batch})
    dec = cmd_decode(dec_args, peak)
    extra = {}
    if args.with_long:
        extra["long_context"] = run_passthrough(args.out, "long-context", shlex.split(args.long_args))
        extra["compile"] = run_passthrough(args.out, "compile", shlex.split(args.compile_args))

    summary_train = [dict(name=r["name"], like_for_like=r["like_for_like"],
                          v4jax_tokens_per_s=r["v4jax"]["tokens_per_s"],
                          transformers_tokens_per_s=(r["transformers"] or {}).get("tokens_per_s"),
                          ratio=r["ratio_tokens_per_s"], v4jax_mfu=r["v4jax"]["mfu"],
                          transformers_mfu=(r["transformers"] or {}).get("mfu"),
                          v4jax_compile_s=r["v4jax"]["compile_s"],
                          optimizer_update_fraction=(r["v4jax"].get("optimizer_update") or {}).get("fraction_of_step"))
                     for r in trains]
    summary_dec = [dict(batch=r["batch"], context=r["context"], v4jax_tok_s=r["v4jax"]["tok_s"],
                        transformers_tok_s=(r["transformers"] or {}).get("tok_s"), ratio=r["ratio_tok_s"],
                        greedy_agreement=r["greedy_agreement"]) for r in dec["rows"]]
    res = {**meta(), "kind": "all", "wall_s": time.perf_counter() - t_all,
           "peak": {"jax_gflops": peak["gflops"],
                    "torch_gflops": (peak_res["torch"] or {}).get("gflops") if peak_res["torch"] else None},
           "train": summary_train, "decode": summary_dec,
           "files": {"peak": "peak.json", "train": [r["name"] + ".json" for r in trains], "decode": "decode.json",
                     **({"long_context": "long_context.json", "compile": "compile.json"} if args.with_long else {})},
           "long_context_rc": extra.get("long_context", {}).get("rc"), "compile_rc": extra.get("compile", {}).get("rc")}
    print("\n=== summary ===")
    print(f"fp32 matmul peak: jax {peak['gflops']:.1f} GFLOP/s"
          + (f", torch {res['peak']['torch_gflops']:.1f} GFLOP/s" if res["peak"]["torch_gflops"] else ""))
    table(["train", "v4jax tok/s", "transformers tok/s", "ratio", "v4jax MFU", "like for like"],
          [[s["name"], f"{s['v4jax_tokens_per_s']:.0f}", fmt(s["transformers_tokens_per_s"], ".0f"),
            fmt(s["ratio"], ".2f"), f"{100 * s['v4jax_mfu']:.2f}%", "yes" if s["like_for_like"] else "no"]
           for s in summary_train])
    table(["decode B", "context", "v4jax tok/s", "transformers tok/s", "ratio", "greedy agreement"],
          [[s["batch"], s["context"], f"{s['v4jax_tok_s']:.1f}", fmt(s["transformers_tok_s"]), fmt(s["ratio"], ".2f"),
            s["greedy_agreement"] or "-"] for s in summary_dec])
    write_json(args.out, "all", res)
    if not args.no_plot:
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        _bars(axes[0], [s["name"].replace("train_", "").replace("_b", "\nb") for s in summary_train],
              {"v4jax": [s["v4jax_tokens_per_s"] for s in summary_train],
               "transformers": [s["transformers_tokens_per_s"] for s in summary_train]}, "train tokens/s")
        axes[0].set_title("training throughput", fontsize=9)
        _bars(axes[1], [f"B={s['batch']}\nC={s['context']}" for s in summary_dec],
              {"v4jax": [s["v4jax_tok_s"] for s in summary_dec],
               "transformers": [s["transformers_tok_s"] for s in summary_dec]}, "decode tokens/s", log=True)
        axes[1].set_title("tiny greedy decode", fontsize=9)
        fig.suptitle(f"v4jax vs transformers, {_cpu_model()}, {os.cpu_count()} CPUs, fp32", fontsize=10)
        _save_png(plt, fig, args.out, "all")
    return res


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help=f"output folder (default {os.path.relpath(DEFAULT_OUT, ROOT)})")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{peak,train,decode,long-context,compile,all}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=argparse.SUPPRESS, help="output folder (also accepted before the subcommand)")
    common.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON,
                        help="a Python with torch + transformers (DeepseekV4ForCausalLM); '' to skip "
                             f"(default {DEFAULT_TORCH_PYTHON or 'none found'})")
    common.add_argument("--peak-n", type=int, default=2048, help="matrix size of the peak measurement")
    common.add_argument("--peak-reps", type=int, default=10, help="timed repeats of the peak matmul (best counts)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--no-plot", action="store_true")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--batch", type=int, default=8)
    train.add_argument("--seq", type=int, default=256)
    train.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    train.add_argument("--moe", default=None, choices=MOE_IMPLS,
                       help="Runtime.moe, passed through (default: the run preset's runtime)")
    train.add_argument("--stage", default="sparse", choices=("sparse", "dense", "indexer_warmup", "follow"),
                       help="curriculum stage the step is pinned to ('follow' = by the step counter)")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both sides; muon uses its preset)")
    train.add_argument("--opt-reps", type=int, default=5, help="timed repeats of the optimizer update alone; 0 = skip")
    train.add_argument("--hf-timeout", type=float, default=3600.0,
                       help="seconds for one transformers run (all: train and decode)")

    sub.add_parser("peak", parents=[common], help="fp32 matmul peak (jax, torch)")
    p = sub.add_parser("train", parents=[common, train], help="train-step throughput vs transformers")
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"))
    p.add_argument("--mtp", default="off", choices=("on", "off"))

    dec = argparse.ArgumentParser(add_help=False)
    dec.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    dec.add_argument("--new-tokens", type=int, default=16, help="decode steps per context (>= 2; step 1 is warm-up)")
    p = sub.add_parser("decode", parents=[common, dec], help="decode throughput vs transformers (decode_bench.py)")
    p.add_argument("--hf-timeout", type=float, default=1800.0, help="seconds for one transformers decode run")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, e.g. --batch 1 8")

    sub.add_parser("long-context", add_help=False, help="experiments/long_context_bench.py (arguments pass through)")
    sub.add_parser("compile", add_help=False, help="experiments/compile_bench.py (arguments pass through)")

    p = sub.add_parser("all", parents=[common, train, dec],
                       help="peak + train (tiny adamw/muon, small adamw) + decode [+ long-context, compile]")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--with-long", action="store_true", help="also run long-context and compile")
    p.add_argument("--long-args", default="", help="arguments for long_context_bench.py (one string)")
    p.add_argument("--compile-args", default="", help="arguments for compile_bench.py (one string)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    passthrough = None
    for i, tok in enumerate(argv):
        if tok in PASSTHROUGH and not (i > 0 and argv[i - 1] == "--out"):
            argv, passthrough = argv[: i + 1], argv[i + 1:]
            break
    args = ap.parse_args(argv)
    args.out = os.path.abspath(getattr(args, "out", None) or DEFAULT_OUT)
    if args.cmd in PASSTHROUGH:
        res = run_passthrough(args.out, args.cmd, passthrough or [])
        return int(res.get("rc") or 0)
    if getattr(args, "new_tokens", 2) < 2:
        ap.error("--new-tokens must be >= 2")
    if getattr(args, "steps", 1) < 1 or getattr(args, "warmup", 0) < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    {"peak": cmd_peak, "train": cmd_train, "decode": cmd_decode, "all": cmd_all}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
