"""Long-context cost of the V4 attention layers (``xla`` path) vs a dense causal baseline, and the
whole ``tiny`` model forward at up to 131K tokens. CPU, fp32, B=1.

    .venv/bin/python experiments/long_context_bench.py --mem-limit-gb 14   # full run (~20 min on 2 cores)
    .venv/bin/python experiments/long_context_bench.py --quick         # smoke run (T=1K,2K; tiny 4K), < 2 min
    .venv/bin/python experiments/long_context_bench.py --seq 4096 16384 --layers csa dense --modes fwd
    .venv/bin/python experiments/long_context_bench.py --no-plot --out /tmp/lc

What is measured
* Layers: one ``v4jax.attention.attention.Attention`` of each type (``window``, ``csa``, ``hca``)
  built from ``preset("flash", ...)`` with Flash's layout scaled down (defaults below: dim 512,
  8 query heads of 128 sharing ONE K=V head, rope 64, window 128, CSA ratio 4 + top-k 512, HCA
  ratio 128, indexer 8 heads x 64, q_lora 256, o_groups 2, o_lora 128), ``Runtime(attention="xla")``,
  inference context ``SeqContext()`` (CSA = indexer top-k, sparse).
* ``dense``: the quadratic baseline as a LAYER with the same projections as ours (low-rank query
  ``wq_a`` -> RMSNorm -> ``wq_b``, per-head unweighted RMS norm, one shared K=V head ``wkv`` ->
  RMSNorm, grouped low-rank output ``wo_a`` [g, H*c/g, o_lora] -> ``wo_b``; no RoPE, no sink) and
  the core ``jax.nn.dot_product_attention(q [B,T,H,c], k=v [B,T,1,c], is_causal=True)`` (MQA:
  one KV head, supported natively; XLA implementation on CPU = materialised [B,H,T,T] logits).
* Modes: ``fwd`` (the layer output) and ``fwd+bwd`` (grad of sum(out**2) wrt x and all params).
* Time: median of ``--reps`` runs after compile (+ ``--warmup`` untimed runs at T <=
  ``--warmup-max-seq``); ``--reps-long`` runs beyond 16K. Compile time is reported separately.
* Memory, per configuration: every (layer, T, mode) runs in a FRESH subprocess. ``rss_gb`` = peak
  RSS of that process (``ru_maxrss``, includes compile) minus its idle RSS (after importing jax
  and initialising the parameters, before the input exists); ``exec_rss_gb`` = the same peak taken
  over execution only (the kernel's VmHWM is reset after compile); ``xla_gb`` = the compiled
  program's memory analysis (temp + argument + output bytes).
* OOM / timeout: the parent watches the child's RSS and kills it above ``--mem-limit-gb``
  (status ``oom``, "killed at RSS limit"); a program whose XLA memory analysis already exceeds
  the limit is not executed (status ``oom``, "predicted by XLA memory analysis"); a child
  running past ``--timeout-s`` is killed (status ``timeout``). Neither crashes the bench.
* Dense with fewer heads: where dense at ``--heads`` is ``oom``, it is rerun with H/2, H/4, ... 1
  heads (rows ``dense-h<H'>``, o_groups = gcd(o_groups, H')) until one fits, so that there is a
  measured dense point (a head count whose fp32 ``[1, H', T, T]`` logits alone exceed the limit is
  recorded as oom without starting a process). The derived ratios say which head count they use,
  and also give a linear-in-H extrapolation of the dense TIME to ``--heads`` (an estimate) and the
  memory ratio against the XLA memory analysis of the full-head dense program (compiled, not run).
* Whole model: ``V4Model.init(preset("tiny", max_seq_len=...))`` forward (logits, no MTP, default
  runtime: xla attention, ragged MoE) at ``--model-seq``, each in its own subprocess.

``--quick`` runs all layer configurations in ONE subprocess (``--shared-process``: no per-process
memory isolation, only the execution peak is per configuration) with 1 rep and no warm-up; it is
a smoke test, not a measurement.

Outputs ``<out>/bench.json`` (``bench_quick.json`` with ``--quick``) with machine info, and
``bench.png`` (log-log time and memory vs T); prints a markdown table and the derived numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "long_context")
LAYERS = ("window", "csa", "hca", "dense")
MODES = ("fwd", "fwd+bwd")
GB = 2 ** 30


# =============================================================================================
# helpers usable without jax (the parent never imports jax, so its own memory stays small)
# =============================================================================================
def meminfo_kb(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_status_kb(pid: int | str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def fmt_t(T: int) -> str:
    return f"{T // 1024}K" if T % 1024 == 0 else str(T)


# =============================================================================================
# worker (one configuration, in a fresh process)
# =============================================================================================
def _emit(tag: str, d: dict) -> None:
    print(f"{tag} {json.dumps(d)}", flush=True)


def _rss_now_bytes() -> int:
    return (proc_status_kb("self", "VmRSS") or 0) * 1024


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, which ru_maxrss also reads) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _layer_cfg(job: dict):
    from v4jax.config import preset

    return preset("flash", dim=job["dim"], n_heads=job["heads"], head_dim=job["head_dim"],
                  rope_head_dim=job["rope_dim"], q_lora_rank=job["q_lora"], o_groups=job["o_groups"],
                  o_lora_rank=job["o_lora"], window_size=job["window"], index_n_heads=job["index_heads"],
                  index_head_dim=job["index_dim"], index_topk=job["topk"], csa_ratio=4,
                  hca_ratio=job["hca_ratio"], max_seq_len=max(job["T"], 4096))


def _dense_module(spec):
    """The quadratic baseline layer: our projections around jax.nn.dot_product_attention."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    def rms(x, eps):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)

    class DenseCausal(nn.Module):
        @nn.compact
        def __call__(self, x):
            s = spec
            B, T, _ = x.shape
            H, c, g = s.n_heads, s.head_dim, s.o_groups
            dense = lambda f, name: nn.Dense(f, use_bias=False, name=name,
                                             kernel_init=nn.initializers.normal(0.02))
            qs = self.param("q_norm", nn.initializers.ones, (s.q_lora_rank,))
            kvs = self.param("kv_norm", nn.initializers.ones, (c,))
            qr = rms(dense(s.q_lora_rank, "wq_a")(x), s.norm_eps) * qs
            q = rms(dense(H * c, "wq_b")(qr).reshape(B, T, H, c), s.norm_eps)
            kv = (rms(dense(c, "wkv")(x), s.norm_eps) * kvs)[:, :, None, :]          # [B, T, 1, c]
            o = jax.nn.dot_product_attention(q, kv, kv, is_causal=True)              # [B, T, H, c]
            wo_a = self.param("wo_a", nn.initializers.normal(0.02), (g, H * c // g, s.o_lora_rank))
            u = jnp.einsum("btgi,gio->btgo", o.reshape(B, T, g, H * c // g), wo_a)
            return dense(s.dim, "wo_b")(u.reshape(B, T, g * s.o_lora_rank))

    return DenseCausal()


def worker(jobs: list[dict]) -> None:
    """Run ``jobs`` one after the other in this process (normally one; ``--shared-process``: more)."""
    for idx, job in enumerate(jobs):
        _run_one(idx, job)


def _run_one(idx: int, job: dict) -> None:
    t_start = time.perf_counter()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    T, mode = job["T"], job["mode"]
    info = {"idx": idx, "backend": jax.default_backend(), "load_avg_at_start": load_avg()}
    if job["kind"] == "model":
        import v4jax
        from v4jax.attention.context import SeqContext

        cfg = v4jax.preset("tiny", max_seq_len=max(T, 4096))
        model = v4jax.V4Model.init(cfg, seed=0, index_select=job.get("index_select", "top_k"))
        variables = jax.block_until_ready(model.variables)
        info.update(runtime=model.runtime.to_dict(),
                    n_params=int(sum(a.size for a in jax.tree.leaves(variables["params"]))))
        f = lambda v, ids: model.module.apply(v, ids, SeqContext(), with_mtp=False)["logits"]
        make_input = lambda: jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    else:
        from v4jax.attention.attention import Attention
        from v4jax.attention.context import SeqContext
        from v4jax.runtime import Runtime

        cfg = _layer_cfg(job)
        layer = job["layer"]
        spec = cfg.attention("window" if layer == "dense" else layer)
        if layer == "dense":
            mod = _dense_module(spec)
            apply = lambda v, x: mod.apply(v, x)
        else:
            mod = Attention(spec, jnp.float32, jnp.float32, Runtime(attention="xla", index_select=job.get("index_select", "top_k")))
            apply = lambda v, x: mod.apply(v, x, SeqContext())[0]
        x0 = jnp.zeros((1, min(T, 256), job["dim"]), jnp.float32)
        variables = jax.block_until_ready(nn.meta.unbox(jax.jit(mod.init)(jax.random.key(0), x0)))
        info["n_params"] = int(sum(a.size for a in jax.tree.leaves(variables)))
        make_input = lambda: jax.random.normal(jax.random.key(1), (1, T, job["dim"]), jnp.float32)
        if mode == "fwd":
            f = apply
        else:
            f = jax.grad(lambda v, x: jnp.sum(apply(v, x) ** 2), argnums=(0, 1))

    # idle baseline: jax imported, parameters initialised, no input yet
    idle_rss = _rss_now_bytes()
    reset_ok = _reset_hwm()
    info.update(idle_rss_gb=idle_rss / GB, setup_s=time.perf_counter() - t_start, hwm_reset=reset_ok)
    _emit("PARTIAL", info)

    inp = jax.block_until_ready(make_input())
    t = time.perf_counter()
    compiled = jax.jit(f).lower(variables, inp).compile()
    info["compile_s"] = time.perf_counter() - t
    try:
        ma = compiled.memory_analysis()
        parts = {k: int(getattr(ma, k + "_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
        info["xla_bytes"] = parts
        info["xla_gb"] = (parts["temp"] + parts["argument"] + parts["output"]) / GB
    except Exception as e:  # noqa: BLE001 - not every backend reports it
        info["xla_gb"] = None
        info["xla_error"] = f"{type(e).__name__}: {e}"
    _emit("PARTIAL", info)
    if info["xla_gb"] is not None and info["xla_gb"] * GB > job["mem_limit_bytes"] - idle_rss:
        info.update(status="oom", why=f"predicted by XLA memory analysis: {info['xla_gb']:.1f} GB + idle "
                                      f"{idle_rss / GB:.1f} GB > RSS limit {job['mem_limit_bytes'] / GB:.1f} GB "
                                      f"(not executed)")
        _emit("RESULT", info)
        return

    compile_peak = _maxrss_bytes()           # input + compile (since the reset; else since the start)
    if reset_ok:
        _reset_hwm()
    times = []
    try:
        for i in range(job["warmup"] + job["reps"]):
            t = time.perf_counter()
            jax.block_until_ready(compiled(variables, inp))
            dt = time.perf_counter() - t
            if i >= job["warmup"]:
                times.append(dt)
            _emit("PARTIAL", dict(info, times_s=times, runs_done=i + 1))
    except Exception as e:  # noqa: BLE001 - a benchmark row, not a test
        msg = f"{type(e).__name__}: {e}"
        info.update(status="oom" if "RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg else "error",
                    why=msg[:2000], times_s=times)
        _emit("RESULT", info)
        return
    exec_peak = _maxrss_bytes()
    peak = max(compile_peak, exec_peak)
    info.update(status="ok", times_s=times, time_s=statistics.median(times),
                rss_gb=max(0, peak - idle_rss) / GB,
                exec_rss_gb=(max(0, exec_peak - idle_rss) / GB) if reset_ok else None,
                peak_rss_gb=peak / GB, total_s=time.perf_counter() - t_start, load_avg_at_end=load_avg())
    _emit("RESULT", info)


# =============================================================================================
# parent: run jobs in a subprocess with an RSS watchdog and a time limit
# =============================================================================================
def run_jobs(jobs: list[dict], timeout_s: float, mem_limit_bytes: int) -> list[dict]:
    """Run ``jobs`` in ONE fresh subprocess (normally a single job); ``timeout_s`` per job."""
    jobs = [dict(j, mem_limit_bytes=mem_limit_bytes) for j in jobs]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(jobs)]
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    limit_s = timeout_s * len(jobs)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    state = {"killed": None, "max_rss": 0}

    def watch():
        while p.poll() is None:
            rss = (proc_status_kb(p.pid, "VmRSS") or 0) * 1024
            state["max_rss"] = max(state["max_rss"], rss)
            if rss > mem_limit_bytes:
                state["killed"] = "oom"
                p.kill()
                return
            if time.perf_counter() - t0 > limit_s:
                state["killed"] = "timeout"
                p.kill()
                return
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = p.communicate()
    th.join()
    wall = time.perf_counter() - t0
    partial: dict[int, dict] = {}
    final: dict[int, dict] = {}
    for line in out.splitlines():
        if line.startswith("PARTIAL "):
            d = json.loads(line[8:])
            partial[d["idx"]] = d
        elif line.startswith("RESULT "):
            d = json.loads(line[7:])
            final[d["idx"]] = d
    results, failed = [], False
    for i in range(len(jobs)):
        if i in final:
            res = dict(final[i])
        elif not failed:
            failed = True
            res = dict(partial.get(i, {}))
            if state["killed"] == "oom":
                res.update(status="oom", why=f"killed at RSS limit {mem_limit_bytes / GB:.1f} GB "
                                             f"(watchdog saw {state['max_rss'] / GB:.1f} GB)")
            elif state["killed"] == "timeout":
                res.update(status="timeout", why=f"exceeded --timeout-s {timeout_s:.0f}s")
            else:
                tail = "\n".join(err.strip().splitlines()[-8:])
                killed = p.returncode in (-9, 137)
                res.update(status="oom" if killed else "error",
                           why=("killed by signal 9 (system OOM killer?)" if killed else f"exit code {p.returncode}")
                           + (f"; stderr tail:\n{tail}" if tail else ""))
        else:
            res = {"status": "skipped", "why": "not run: an earlier configuration in the same process failed"}
        if res.get("status") != "ok":
            if res.get("times_s"):
                res["partial_time_s"] = statistics.median(res["times_s"])
            for k in ("time_s", "rss_gb", "exec_rss_gb"):
                res[k] = None
        res.update(wall_s=wall if len(jobs) == 1 else None, process_wall_s=wall, shared_process=len(jobs) > 1,
                   watchdog_max_rss_gb=state["max_rss"] / GB)
        results.append(res)
    return results


# =============================================================================================
# reporting
# =============================================================================================
def cell_time(r: dict) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "?")
    t = r["time_s"]
    return f"{t * 1e3:.0f} ms" if t < 10 else f"{t:.1f} s"


def cell_mem(r: dict) -> str:
    if r is None:
        return "-"
    x = r.get("xla_gb")
    xs = f"{x:.2f}" if x is not None else "-"
    if r.get("status") != "ok":
        return f"{r.get('status', '?')} (xla {xs})"
    return f"{r['rss_gb']:.2f} / {xs}"


def row_name(r: dict) -> str:
    return r["name"]


def derived(results: list[dict], heads: int, seqs: list[int], T32: int = 32768) -> dict:
    """CSA/HCA/window vs dense at T=T32 (32K), time growth per doubling, tiny forward at its largest T."""
    by = {(r["name"], r["T"], r["mode"]): r for r in results if r["kind"] == "layer"}
    ok = lambda r: r is not None and r.get("status") == "ok"
    d: dict = {"ratio_seq": T32, "ratios_32k": {}, "per_doubling": {}, "dense_per_doubling_per_head": {}}

    def dense_best(T, mode):
        """The measured dense row at T with the most heads (the full-head one if it ran)."""
        rows = [r for r in results if r["kind"] == "layer" and r["name"].startswith("dense") and r["T"] == T
                and r["mode"] == mode and ok(r)]
        return max(rows, key=lambda r: r["heads"]) if rows else None

    for mode in MODES:
        dense_full = by.get(("dense", T32, mode))
        dm = dense_best(T32, mode)
        est = None
        if dm is None:      # nothing measured at 32K: extrapolate the largest measured T as T^2 and heads linearly
            lower = [dense_best(T, mode) for T in seqs if T < T32]
            lower = [r for r in lower if r is not None]
            if lower:
                src = max(lower, key=lambda r: r["T"])
                est = {"from": f"{src['name']} at T={fmt_t(src['T'])}",
                       "dense_time_s_estimate": src["time_s"] * (T32 / src["T"]) ** 2 * heads / src["heads"]}
                d.setdefault("dense_estimates", {})[mode] = est
        for lay in ("window", "csa", "hca"):
            r = by.get((lay, T32, mode))
            if not ok(r):
                continue
            e: dict = {}
            if dm is not None:
                hd = dm["heads"]
                e.update(dense_row=dm["name"], dense_heads=hd, time_ratio=r["time_s"] / dm["time_s"],
                         rss_ratio=r["rss_gb"] / dm["rss_gb"] if dm["rss_gb"] else None,
                         xla_mem_ratio=r["xla_gb"] / dm["xla_gb"] if dm.get("xla_gb") else None)
                if hd != heads:
                    e[f"time_ratio_vs_dense_{heads}h_estimate"] = r["time_s"] / (dm["time_s"] * heads / hd)
            elif est is not None:
                e.update(dense_row=None, **{f"time_ratio_vs_dense_{heads}h_estimate": r["time_s"] / est["dense_time_s_estimate"],
                                            "estimate_from": est["from"] + f" x ({fmt_t(T32)}/T)^2 x heads ratio"})
            if dense_full is not None and dense_full.get("xla_gb"):
                e[f"xla_mem_ratio_vs_dense_{heads}h_compiled"] = r["xla_gb"] / dense_full["xla_gb"]
                e[f"dense_{heads}h_xla_gb"] = dense_full["xla_gb"]
            if e:
                d["ratios_32k"][f"{lay}/{mode}"] = e
    names = sorted({r["name"] for r in results if r["kind"] == "layer"},
                   key=lambda n: (LAYERS.index(n.split("-")[0]), n))
    for name in names:
        for mode in MODES:
            pts = [(T, by[(name, T, mode)]["time_s"]) for T in seqs if ok(by.get((name, T, mode)))]
            if len(pts) >= 2:
                d["per_doubling"][f"{name}/{mode}"] = {
                    f"{fmt_t(a)}->{fmt_t(b)}": (tb / ta) ** (1.0 / math.log2(b / a))
                    for (a, ta), (b, tb) in zip(pts, pts[1:])}
    for mode in MODES:     # dense with the most heads that ran at each T, time per head
        pts = [(T, r["time_s"] / r["heads"], r["heads"]) for T in seqs for r in [dense_best(T, mode)] if r]
        if len(pts) >= 2:
            d["dense_per_doubling_per_head"][mode] = {
                f"{fmt_t(a)}->{fmt_t(b)} ({ha}h->{hb}h)": (tb / ta) ** (1.0 / math.log2(b / a))
                for (a, ta, ha), (b, tb, hb) in zip(pts, pts[1:])}
    models = [r for r in results if r["kind"] == "model"]
    if models:
        big = max(models, key=lambda r: r["T"])
        d["tiny_forward_largest_T"] = {"T": big["T"], "status": big["status"], "time_s": big.get("time_s"),
                                       "rss_gb": big.get("rss_gb"), "peak_rss_gb": big.get("peak_rss_gb"),
                                       "xla_gb": big.get("xla_gb")}
    return d


def print_report(meta: dict, results: list[dict], der: dict) -> None:
    layers = [r for r in results if r["kind"] == "layer"]
    seqs = sorted({r["T"] for r in layers})
    names = sorted({r["name"] for r in layers}, key=lambda n: (LAYERS.index(n.split("-")[0]), -(int(n.split("-h")[1]) if "-h" in n else 10**6)))
    by = {(r["name"], r["T"], r["mode"]): r for r in layers}
    a = meta["args"]
    print(f"\n### Attention layers, B=1, fp32, CPU ({meta['machine']['cpu_count']} cores)\n")
    print(f"dim {a['dim']}, {a['heads']} query heads x {a['head_dim']} sharing one K=V head, rope {a['rope_dim']}, "
          f"window {a['window']}, CSA ratio 4 top-k {a['topk']}, HCA ratio {a['hca_ratio']}, indexer "
          f"{a['index_heads']}x{a['index_dim']}, q_lora {a['q_lora']}, o_groups {a['o_groups']}, o_lora {a['o_lora']}. "
          f"Time = median after compile; memory = peak RSS above idle (GB) / XLA temp+arg+out (GB).\n")
    for mode in MODES:
        if not any(k[2] == mode for k in by):
            continue
        print(f"**{mode}**\n")
        print("| layer | " + " | ".join(f"T={fmt_t(T)} time" for T in seqs) + " | " +
              " | ".join(f"T={fmt_t(T)} mem" for T in seqs) + " |")
        print("|---|" + "---:|" * (2 * len(seqs)))
        for n in names:
            if not any((n, T, mode) in by for T in seqs):
                continue
            print(f"| {n} | " + " | ".join(cell_time(by.get((n, T, mode))) for T in seqs) + " | " +
                  " | ".join(cell_mem(by.get((n, T, mode))) for T in seqs) + " |")
        print()
    models = sorted((r for r in results if r["kind"] == "model"), key=lambda r: r["T"])
    if models:
        print("**tiny model forward (logits), B=1**\n")
        print("| T | time | peak RSS above idle GB | peak RSS GB | XLA temp+arg+out GB | compile s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in models:
            ok = r["status"] == "ok"
            print(f"| {fmt_t(r['T'])} | {cell_time(r)} | {r['rss_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
                  if ok else f"| {fmt_t(r['T'])} | {r['status']} | - | - | ", end="")
            print(f"{r['xla_gb']:.2f} | " if r.get("xla_gb") is not None else "- | ", end="")
            print(f"{r['compile_s']:.1f} |" if r.get("compile_s") is not None else "- |")
        print()
    print("**derived**\n")
    f3 = lambda v: "-" if v is None else f"{v:.3f}"
    for k, e in der["ratios_32k"].items():
        extra = "".join(f", {kk} {f3(v)}" for kk, v in e.items() if kk.startswith(("time_ratio_vs", "xla_mem_ratio_vs")))
        if e.get("dense_row"):
            print(f"- T={fmt_t(der['ratio_seq'])} {k} / {e['dense_row']} ({e['dense_heads']} heads): time {f3(e['time_ratio'])}, "
                  f"RSS {f3(e['rss_ratio'])}, XLA memory {f3(e['xla_mem_ratio'])}{extra}")
        else:
            print(f"- T={fmt_t(der['ratio_seq'])} {k}: no dense measured at that T{extra} ({e.get('estimate_from', '')})")
    print("- time x per doubling of T (consecutive measured T; geometric mean over the gap):")
    for k, e in der["per_doubling"].items():
        print(f"  - {k}: " + ", ".join(f"{kk} {v:.2f}" for kk, v in e.items()))
    for k, e in der["dense_per_doubling_per_head"].items():
        print(f"  - dense (most heads that ran, time per head) {k}: " + ", ".join(f"{kk} {v:.2f}" for kk, v in e.items()))
    if "tiny_forward_largest_T" in der:
        e = der["tiny_forward_largest_T"]
        if e["status"] == "ok":
            print(f"- tiny forward at T={e['T']}: {e['time_s']:.1f} s, peak RSS {e['peak_rss_gb']:.2f} GB "
                  f"({e['rss_gb']:.2f} GB above idle), XLA {e['xla_gb']:.2f} GB")
        else:
            print(f"- tiny forward at T={e['T']}: {e['status']}")
    bad = [r for r in results if r["status"] not in ("ok",)]
    if bad:
        print("\n**not measured**\n")
        for r in bad:
            print(f"- {r['name']} T={fmt_t(r['T'])} {r['mode']}: {r['status']}: {r.get('why', '')}")


def plot(results: list[dict], path: str, mem_limit_gb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"window": "tab:blue", "csa": "tab:orange", "hca": "tab:green", "dense": "tab:red", "tiny": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    groups: dict = {}
    for r in results:
        groups.setdefault((r["name"], r["mode"]), []).append(r)
    for (name, mode), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["T"])
        base = "tiny" if name.startswith("tiny") else name.split("-")[0]
        ls = "-" if mode == "fwd" else "--"
        marker = "o" if "-h" not in name else "s"
        alpha = 1.0 if "-h" not in name else 0.6
        label = f"{name} {mode}"
        ok = [r for r in rs if r["status"] == "ok"]
        if ok:
            axes[0].plot([r["T"] for r in ok], [r["time_s"] for r in ok], ls, marker=marker, color=colors[base],
                         alpha=alpha, label=label)
            axes[1].plot([r["T"] for r in ok], [max(r["rss_gb"], 1e-3) for r in ok], ls, marker=marker,
                         color=colors[base], alpha=alpha, label=label)
        oom = [r for r in rs if r["status"] == "oom"]
        if oom:
            axes[1].plot([r["T"] for r in oom], [mem_limit_gb] * len(oom), "x", color=colors[base], ms=10, mew=2)
    axes[1].axhline(mem_limit_gb, color="gray", lw=0.8, ls=":")
    axes[1].annotate(f"RSS limit {mem_limit_gb:.1f} GB (x = oom)", (0.02, mem_limit_gb), xycoords=("axes fraction", "data"),
                     xytext=(0, 3), textcoords="offset points", fontsize=8, color="gray")
    from matplotlib.ticker import FuncFormatter

    for ax, yl in zip(axes, ("time per call (s)", "peak RSS above idle (GB)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_t(int(v)) if v >= 1 else ""))
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("v4jax attention layers (xla path) vs dense causal, and tiny model forward; CPU fp32 B=1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =============================================================================================
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: T=1K,2K, 1 rep, tiny model at 4K only")
    ap.add_argument("--seq", type=int, nargs="+", default=None, help="layer T values (default 1K 4K 8K 16K 32K 64K)")
    ap.add_argument("--model-seq", type=int, nargs="*", default=None, help="tiny model T (default 8K 32K 128K)")
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8, help="query heads (Flash: 64)")
    ap.add_argument("--head-dim", type=int, default=128, help="c, the K=V head width (Flash: 512)")
    ap.add_argument("--rope-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--hca-ratio", type=int, default=128)
    ap.add_argument("--index-heads", type=int, default=8, help="Flash: 64")
    ap.add_argument("--index-dim", type=int, default=64, help="Flash: 128")
    ap.add_argument("--q-lora", type=int, default=256, help="Flash: 1024")
    ap.add_argument("--o-groups", type=int, default=2, help="Flash: 8")
    ap.add_argument("--o-lora", type=int, default=128, help="Flash: 1024")
    ap.add_argument("--index-select", default="top_k", choices=("top_k", "threshold"),
                    help="Runtime.index_select of the CSA layers and the tiny model (the indexer's running top-k)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs at T <= 16K")
    ap.add_argument("--reps-long", type=int, default=1, help="timed runs at T > 16K")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs after compile at T <= --warmup-max-seq")
    ap.add_argument("--warmup-max-seq", type=int, default=4096)
    ap.add_argument("--timeout-s", type=float, default=420.0, help="per layer configuration (whole subprocess)")
    ap.add_argument("--model-timeout-s", type=float, default=900.0, help="per tiny-model configuration")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="RSS above which a configuration is killed as oom "
                         "(default: min(60%% of MemTotal, 75%% of MemAvailable at start))")
    ap.add_argument("--shared-process", action="store_true",
                    help="run all layer configurations in ONE subprocess (faster; memory then not per process; "
                         "default with --quick)")
    ap.add_argument("--no-dense-fallback", action="store_true", help="do not retry an oom dense with fewer heads")
    ap.add_argument("--ratio-seq", type=int, default=32768, help="T of the derived layer/dense ratios")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()

    if args.worker:
        worker(json.loads(args.worker))
        return

    t_start = time.perf_counter()
    if args.quick:
        seqs = args.seq or [1024, 2048]
        model_seqs = args.model_seq if args.model_seq is not None else [4096]
        args.reps, args.reps_long, args.warmup = 1, 1, 0
        args.shared_process = True
        stem = "bench_quick"
    else:
        seqs = args.seq or [1024, 4096, 8192, 16384, 32768, 65536]
        model_seqs = args.model_seq if args.model_seq is not None else [8192, 32768, 131072]
        stem = "bench"
    avail_kb = meminfo_kb("MemAvailable") or 8 * 2 ** 20
    total_kb = meminfo_kb("MemTotal") or avail_kb
    mem_limit_gb = args.mem_limit_gb or min(0.6 * total_kb, 0.75 * avail_kb) / 2 ** 20
    mem_limit = int(mem_limit_gb * GB)
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable]
                            + [os.path.relpath(os.path.abspath(__file__), ROOT)] + sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "jax": pkg_version("jax"), "jaxlib": pkg_version("jaxlib"),
                    "flax": pkg_version("flax"), "mem_total_gb": (meminfo_kb("MemTotal") or 0) / 2 ** 20,
                    "mem_available_gb_at_start": avail_kb / 2 ** 20, "load_avg_at_start": load_avg(),
                    "git_commit": git_commit()},
        "mem_limit_gb": mem_limit_gb, "timeout_s": args.timeout_s, "model_timeout_s": args.model_timeout_s,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "seqs": seqs, "model_seqs": model_seqs,
    }
    print(f"{meta['date']}  {meta['machine']['cpu_model']}, {os.cpu_count()} CPUs, jax {meta['machine']['jax']}, "
          f"MemAvailable {avail_kb / 2 ** 20:.1f} GB -> RSS limit {mem_limit_gb:.1f} GB, timeout {args.timeout_s:.0f}s "
          f"per config, load avg {load_avg()}", flush=True)

    dims = dict(dim=args.dim, heads=args.heads, head_dim=args.head_dim, rope_dim=args.rope_dim, window=args.window,
                topk=args.topk, hca_ratio=args.hca_ratio, index_heads=args.index_heads, index_dim=args.index_dim,
                q_lora=args.q_lora, o_groups=args.o_groups, o_lora=args.o_lora, index_select=args.index_select)
    results: list[dict] = []

    def make_job(kind: str, name: str, T: int, mode: str, extra: dict | None = None) -> dict:
        return dict(dims, kind=kind, name=name, layer=name.split("-")[0], T=T, mode=mode,
                    reps=args.reps_long if T > 16384 else args.reps,
                    warmup=args.warmup if T <= args.warmup_max_seq else 0, **(extra or {}))

    def record(job: dict, r: dict) -> dict:
        lay = job["kind"] == "layer"
        r.update(kind=job["kind"], name=job["name"], T=job["T"], mode=job["mode"], heads=job["heads"] if lay else None,
                 o_groups=job["o_groups"] if lay else None, reps=job["reps"], warmup=job["warmup"])
        results.append(r)
        t_s = f"{r['time_s'] * 1e3:10.1f} ms" if r.get("time_s") is not None else f"{r['status']:>13}"
        mem = f"rss+{r['rss_gb']:.2f} GB" if r.get("rss_gb") is not None else "rss -"
        xg = f"xla {r['xla_gb']:.2f} GB" if r.get("xla_gb") is not None else "xla -"
        cs = f"compile {r['compile_s']:.1f}s" if r.get("compile_s") is not None else ""
        wall = (f"wall {r['wall_s']:.0f}s" if r.get("wall_s") is not None else
                "(shared process)" if r.get("shared_process") else "(not started)")
        print(f"  {job['name']:10} T={fmt_t(job['T']):>5} {job['mode']:8} {t_s}  {mem:15} {xg:16} {cs:14} {wall}"
              + (f"  [{r.get('why', '')[:200]}]" if r["status"] != "ok" else ""), flush=True)
        return r

    def run(job: dict) -> dict:
        timeout = args.model_timeout_s if job["kind"] == "model" else args.timeout_s
        return record(job, run_jobs([job], timeout, mem_limit)[0])

    def dense_fallback(T: int, mode: str) -> None:
        h = args.heads // 2
        while h >= 1:
            job = make_job("layer", f"dense-h{h}", T, mode, {"heads": h, "o_groups": math.gcd(args.o_groups, h)})
            logits = 4 * h * T * T          # the [1, h, T, T] fp32 logits the XLA implementation materialises
            if logits > mem_limit:          # cannot fit: do not even start a process
                r = record(job, {"status": "oom", "why": f"not started: the fp32 [1, {h}, T, T] logits alone are "
                                 f"{logits / GB:.1f} GB > limit {mem_limit_gb:.1f} GB",
                                 "time_s": None, "rss_gb": None, "exec_rss_gb": None, "xla_gb": None})
            else:
                r = run(job)
            if r["status"] != "oom":
                return
            h //= 2

    layer_jobs = [make_job("layer", lay, T, mode) for T in seqs for lay in args.layers for mode in args.modes]
    if args.shared_process:
        for job, r in zip(layer_jobs, run_jobs(layer_jobs, args.timeout_s, mem_limit)):
            record(job, r)
    for job in layer_jobs:
        r = next(x for x in results if x["name"] == job["name"] and x["T"] == job["T"] and x["mode"] == job["mode"]) \
            if args.shared_process else run(job)
        if job["layer"] == "dense" and r["status"] == "oom" and not args.no_dense_fallback:
            dense_fallback(job["T"], job["mode"])
    for T in model_seqs:
        run(make_job("model", "tiny", T, "fwd"))

    meta["total_s"] = time.perf_counter() - t_start
    meta["machine"]["load_avg_at_end"] = load_avg()
    der = derived(results, args.heads, seqs, args.ratio_seq)
    out_json = os.path.join(args.out, f"{stem}.json")
    with open(out_json, "w") as f:
        json.dump({"meta": meta, "results": results, "derived": der}, f, indent=1)
    print_report(meta, results, der)
    print(f"\nwrote {os.path.relpath(out_json, ROOT)}", end="")
    if not args.no_plot:
        try:
            png = os.path.join(args.out, f"{stem}.png")
            plot(results, png, mem_limit_gb)
            print(f", {os.path.relpath(png, ROOT)}", end="")
        except ImportError as e:
            print(f"; no plot ({e}; pip install matplotlib, or pass --no-plot)", end="")
    print(f"; total {meta['total_s']:.0f}s")


if __name__ == "__main__":
    main()
