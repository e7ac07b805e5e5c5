"""Soak test: a long training run of the ``tiny`` model must not grow host memory and must not
recompile after its first steps. Both are measured, on the real loop (``v4jax.train.loop.train``:
grain data pipeline, jitted train step over the three curriculum stages, periodic evaluation,
orbax async checkpoints with checksums, metrics.jsonl + TensorBoard, the tqdm bar).

    .venv/bin/python experiments/soak.py                          # 3000 steps: ~32 min on an idle 2-core CPU
    .venv/bin/python experiments/soak.py --steps 1500             # ~16 min (same schedule, scaled)
    .venv/bin/python experiments/soak.py --steps 300 --keep       # a short check; keep the workdir
    nice -n 5 .venv/bin/python experiments/soak.py --out experiments/results/soak > /tmp/soak.log 2>&1

The model is the ``tiny`` preset's architecture unchanged; only the loop and data settings are made
small so that one step is cheap: 2 x 64 tokens per step (``--batch-size``, ``--seq-len``), and Muon
with 1 of its 10 Newton-Schulz iterations (``--ns-iters``; 10 = the preset's optimizer). On a CPU the
tiny step is dominated by Muon, not by the tokens: the orthogonalisation of the ~27M parameters'
matrices costs ~1.6 s per step with 10 iterations (a shared 2-core CPU) while the forward of 2 x 32
tokens takes 0.06 s, and 2 x 32, 2 x 64 and 2 x 128 tokens cost about the same; with 1 iteration a
step of 2 x 64 tokens takes ~0.55 s (idle) to ~0.9 s (shared), so 3000 steps take 30-50 minutes.
The NS loop is a ``lax.scan`` inside the same jitted step, so its length changes neither what is
compiled nor what is allocated per step. (``batch_size=1`` does not work: grain's
``repeat(None).batch(1)`` overflows ``len``.) The schedule scales with ``--steps`` (3000: dense
attention for steps 0-199, indexer warm-up 200-299, sparse from 300; a log row every 10 steps,
evaluation of 2 batches at step 0 and every 500 steps, a checkpoint every 250 steps, 3 kept).

What is measured, in this process:

- host memory from a background thread every ``--interval`` s and at every metrics row
  (``on_log``), with the step (background samples get the step interpolated between rows): RSS
  and its parts from ``/proc/self/status`` (``RssAnon``: heap and arrays, where a leak shows;
  ``RssFile``: mapped libraries and files, which the kernel drops and re-reads under memory
  pressure from other processes, so RSS alone can fall by a GiB and hide a leak) and glibc's
  ``mallinfo2`` bytes in use and free-but-held; plus the thread count, open files and
  ``len(jax.live_arrays())`` at each row, and the gc-tracked Python objects by type every 500 steps;
- every XLA compilation, through ``jax.monitoring`` (the ``/jax/core/compile/backend_compile_duration``
  event, whose ``fun_name`` names the function), with the time, the thread and the last logged
  step; ``jax_log_compiles`` is on as well and its "Compiling ... with global shapes" records are
  kept, so a recompile can be traced to the shapes that caused it.

Warm-up ends after the first checkpoint (step ``--warmup-steps``, default ``checkpoint_every``):
by then every code path of the loop (first train step, step-0 evaluation, first checkpoint) has
run once. Any compile after it fails the run (``--allow REGEX`` exempts a function name), as does
growth of RSS or of RssAnon over the second half of the run above ``--max-growth-mib`` (the
least-squares slope vs step over all samples of the second half, times its length); a run stopped
by a signal exits 2. Writes ``<out>/soak.json`` and ``<out>/rss.png`` (memory vs step, compile
events, evaluations and checkpoints marked) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1024 * 1024
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def schedule(steps: int, seq_len: int, batch_size: int, log_every: int, ns_iters: int = 10) -> list[str]:
    """Loop/data overrides of the tiny preset for a run of ``steps`` steps (3000: the values in the
    docstring), and Muon with the first ``ns_iters`` of its 10 Newton-Schulz iterations; the model
    is untouched."""
    from v4jax.train.optimizer import V4_NS_COEFFS

    dense = max(1, round(steps / 15))
    warm = max(1, round(steps / 30))
    decay = max(dense + warm, round(steps * 0.8))
    return [f"total_steps={steps}", f"optim.total_steps={steps}", f"optim.decay_start={decay}",
            f"optim.warmup_steps={min(10, decay)}",
            f"dense_attention_steps={dense}", f"indexer_warmup_steps={warm}",
            f"seq_len={seq_len}", f"batch_size={batch_size}", f"log_every={log_every}",
            f"eval_every={max(1, steps // 6)}", "eval_batches=2",
            f"checkpoint_every={max(1, steps // 12)}", "keep_checkpoints=3"] + (
                [] if ns_iters == len(V4_NS_COEFFS) else ["optim.muon_ns_coeffs=" + json.dumps(
                    [list(c) for c in V4_NS_COEFFS[:ns_iters]], separators=(",", ":"))])


def _mallinfo():
    """glibc ``mallinfo2`` (None elsewhere): heap bytes in use / held free by malloc."""
    import ctypes

    class M(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = M
    return f


class Monitor:
    """Memory samples (background thread + metrics rows) and compile events, each with a step.
    A sample holds ``rss`` (VmRSS) split into ``anon`` (RssAnon: heap, arrays, what a leak grows)
    and ``file`` (RssFile + RssShmem: mapped libraries and files, which the kernel may drop and
    re-read under memory pressure), and ``heap`` (glibc malloc bytes in use, ``mallinfo2``)."""

    def __init__(self, interval: float):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()
        self.samples: list[dict] = []       # {"t", "rss", "src": "bg"|"row", ["step"]}
        self.rows: list[dict] = []          # train rows: {"t", "step", "rss", ...}
        self.evals: list[dict] = []
        self.compiles: list[dict] = []
        self.compile_logs: list[dict] = []
        self.messages: list[dict] = []
        self.gc_types: dict = {}
        self.last_step: int | None = None   # step of the last train row (None: before the first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    _minfo = None

    def mem(self) -> dict:
        out = {}
        try:
            with open("/proc/self/status") as f:
                kv = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem")))
            kb = {k: int(v.split()[0]) * 1024 for k, v in kv.items()}
            out = {"rss": kb["VmRSS"], "anon": kb["RssAnon"], "file": kb["RssFile"] + kb.get("RssShmem", 0)}
        except (OSError, KeyError, ValueError):
            out = {"rss": self.proc.memory_info().rss}
        if Monitor._minfo is None:
            Monitor._minfo = _mallinfo() or False
        if Monitor._minfo:
            m = Monitor._minfo()
            out["heap"] = m.uordblks + m.hblkhd
            out["heap_free"] = m.fordblks           # freed, still held by malloc (counted in RssAnon when touched)
        return out

    def rss(self) -> int:
        return self.mem()["rss"]

    def _run(self):
        while not self._stop.wait(self.interval):
            s = {"t": self.now(), **self.mem(), "src": "bg"}
            with self.lock:
                self.samples.append(s)

    def start(self):
        import jax

        jax.monitoring.register_event_duration_secs_listener(self.on_event)
        jax.config.update("jax_log_compiles", True)
        h = _ListHandler(self)
        for name in ("jax._src.interpreters.pxla", "jax._src.dispatch"):
            lg = logging.getLogger(name)
            lg.addHandler(h)
            lg.propagate = False            # keep the WARNING-level compile logs out of stderr
        self.samples.append({"t": self.now(), **self.mem(), "src": "start"})
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.samples.append({"t": self.now(), **self.mem(), "src": "end"})

    def on_event(self, event: str, duration: float, **kw):
        if event != COMPILE_EVENT:
            return
        with self.lock:
            self.compiles.append({"t": self.now(), "after_row": self.last_step, "fun_name": str(kw.get("fun_name")),
                                  "seconds": round(duration, 3), "thread": threading.current_thread().name})

    def on_log(self, row: dict):
        import jax

        t, m = self.now(), self.mem()
        rss = m["rss"]
        if row.get("eval"):
            self.evals.append({"t": t, "step": int(row["step"]), "loss": float(row["loss"]), "rss": rss})
            with self.lock:
                self.samples.append({"t": t, **m, "src": "eval", "step": int(row["step"])})
            return
        step = int(row["step"])
        r = {"t": t, "step": step, "rss": rss, "tokens_per_s": float(row["tokens_per_s"]),
             "loss": float(row["loss"]), "stage": row.get("stage"), "threads": self.proc.num_threads(),
             "open_files": len(self.proc.open_files()), "live_arrays": len(jax.live_arrays())}
        if step % 500 == 0:          # Python objects tracked by gc, by type (growth -> a leak of Python objects)
            import gc
            from collections import Counter

            objs = gc.get_objects()
            r["gc_objects"] = len(objs)
            self.gc_types[step] = Counter(type(o).__qualname__ for o in objs)
            del objs
        self.rows.append(r)
        with self.lock:
            self.samples.append({"t": t, **m, "src": "row", "step": step})
            self.last_step = step

    def log(self, msg: str, *a, **k):
        self.messages.append({"t": self.now(), "after_row": self.last_step, "msg": str(msg)})
        print(f"[{self.now():7.1f}s] {msg}", flush=True)


class _ListHandler(logging.Handler):
    def __init__(self, mon: Monitor):
        super().__init__(logging.DEBUG)
        self.mon = mon

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.mon.compile_logs.append({"t": self.mon.now(), "after_row": self.mon.last_step, "msg": msg[:400]})


def step_at(mon: Monitor, t: float) -> float:
    """Step at time ``t``, linear between train rows (0 before the first row)."""
    import numpy as np

    if not mon.rows:
        return 0.0
    ts = [0.0] + [r["t"] for r in mon.rows]
    st = [0.0] + [r["step"] for r in mon.rows]
    if t <= mon.rows[0]["t"]:
        return 0.0
    return float(np.interp(t, ts, st))


def analyse(mon: Monitor, args, cfg, warmup: int, wall: float, train_wall: float, result) -> dict:
    import numpy as np

    steps = args.steps
    for s in mon.samples:
        if "step" not in s:
            s["step"] = step_at(mon, s["t"])
    samples = sorted(mon.samples, key=lambda s: s["t"])
    # the warm-up ends with the first train row after step `warmup` (its checkpoint has been queued and,
    # at the next save, committed: everything of the first checkpoint has compiled)
    t_warm = next((r["t"] for r in mon.rows if r["step"] > warmup), float("inf"))
    allow = re.compile(args.allow) if args.allow else None
    for c in mon.compiles:
        c["step"] = round(step_at(mon, c["t"]), 1)
        c["phase"] = ("setup" if c["after_row"] is None else "warmup") if c["t"] < t_warm else "after_warmup"
        c["allowed"] = bool(allow and allow.search(c["fun_name"]))
    phases = {p: sum(1 for c in mon.compiles if c["phase"] == p) for p in ("setup", "warmup", "after_warmup")}
    late = [c for c in mon.compiles if c["phase"] == "after_warmup"]
    unexpected = [c for c in late if not c["allowed"]]

    def rss_near(step):
        cand = [s for s in samples if s["src"] in ("row", "bg") and s["step"] >= step]
        return cand[0]["rss"] / MiB if cand else None

    half = steps / 2
    second = [s for s in samples if s["src"] in ("row", "bg", "eval") and s["step"] >= half and s["t"] <= mon.rows[-1]["t"]]
    x = np.array([s["step"] for s in second], float)
    y = np.array([s["rss"] for s in second], float) / MiB
    fit = [float(v) for v in np.polyfit(x, y, 1)] if len(x) >= 3 and np.ptp(x) > 0 else [float("nan")] * 2
    slope = fit[0] * 1000
    growth_fit = slope * (steps - half) / 1000
    # the same fit for the parts of RSS: anonymous memory (a leak), file-backed pages, malloc's heap in use
    parts = {}
    for key in ("anon", "file", "heap", "heap_free"):
        pts = [(s["step"], s[key] / MiB) for s in second if key in s]
        if len(pts) >= 3:
            k = float(np.polyfit(*zip(*pts), 1)[0]) * 1000
            vals = [s[key] / MiB for s in samples if key in s]
            parts[key] = {"slope_second_half_mib_per_1000_steps": round(k, 3),
                          "fit_growth_second_half_mib": round(k * (steps - half) / 1000, 2),
                          "after_warmup": _r(_near(samples, warmup + cfg.log_every, key)),
                          "middle": _r(_near(samples, half, key)), "last_row": _r(_near(samples, steps, key)),
                          "min_second_half": round(min(p[1] for p in pts), 1),
                          "max_second_half": round(max(p[1] for p in pts), 1), "peak": round(max(vals), 1)}
    growth_anon = parts.get("anon", {}).get("fit_growth_second_half_mib", float("-inf"))
    # less noisy views: RSS at the metrics rows only (the loop is between steps there: no step in
    # flight), and the median / minimum of each 100-step bin (a leak lifts the floor as well as the peaks)
    rows2 = [(r["step"], r["rss"] / MiB) for r in mon.rows if r["step"] >= half]
    slope_rows = float(np.polyfit(*zip(*rows2), 1)[0]) * 1000 if len(rows2) >= 3 else float("nan")
    bins = {}
    for s in samples:
        if s["src"] in ("row", "bg", "eval") and s["t"] <= mon.rows[-1]["t"]:
            bins.setdefault(int(s["step"] // 100) * 100, []).append(s["rss"] / MiB)
    binned = [{"from_step": k, "median": round(float(np.median(v)), 1), "min": round(float(np.min(v)), 1),
               "max": round(float(np.max(v)), 1), "n": len(v)} for k, v in sorted(bins.items())]
    b2 = [b for b in binned if b["from_step"] >= half and b["n"] >= 3]
    slope_bins = float(np.polyfit([b["from_step"] for b in b2], [b["median"] for b in b2], 1)[0]) * 1000 \
        if len(b2) >= 3 else float("nan")
    slope_floor = float(np.polyfit([b["from_step"] for b in b2], [b["min"] for b in b2], 1)[0]) * 1000 \
        if len(b2) >= 3 else float("nan")
    all_rss = np.array([s["rss"] for s in samples], float) / MiB
    rows_after = [r for r in mon.rows if r["t"] > t_warm]
    # tokens/s: the loop's own per-row figure (eval and checkpoint time lands in the row after them)
    tps = np.array([r["tokens_per_s"] for r in rows_after]) if rows_after else np.array([np.nan])
    t_first, t_last = mon.rows[0]["t"], mon.rows[-1]["t"]
    tokens = (mon.rows[-1]["step"] - mon.rows[0]["step"]) * cfg.batch_size * cfg.seq_len
    import resource

    ru_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB on Linux
    threads = [r["threads"] for r in mon.rows]
    live = [r["live_arrays"] for r in mon.rows]
    # a leak shows in RssAnon; file-backed pages can fall under memory pressure and hide it in RSS: both must pass
    ok_rss = growth_fit <= args.max_growth_mib and growth_anon <= args.max_growth_mib
    gc_growth = {}
    if len(mon.gc_types) >= 2:
        ks = sorted(mon.gc_types)
        a, b = mon.gc_types[ks[0]], mon.gc_types[ks[-1]]
        gc_growth = {"from_step": ks[0], "to_step": ks[-1], "types": dict(sorted(
            ((t, b[t] - a.get(t, 0)) for t in b if b[t] - a.get(t, 0) > 0), key=lambda kv: -kv[1])[:15])}
    ok_compile = not unexpected
    return {
        "ok": bool(ok_rss and ok_compile), "ok_rss": bool(ok_rss), "ok_compiles": bool(ok_compile),
        "steps": steps, "final_step": result.step, "warmup_steps": warmup, "warmup_ends_s": round(t_warm, 1),
        "settings": {"preset": "tiny", "model": cfg.model.name, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                     "tokens_per_step": cfg.seq_len * cfg.batch_size, "overrides": args.overrides,
                     "muon_ns_iterations": len(cfg.optim.muon_ns_coeffs),
                     "stages": {"dense": [0, cfg.dense_attention_steps],
                                "indexer_warmup": [cfg.dense_attention_steps,
                                                   cfg.dense_attention_steps + cfg.indexer_warmup_steps],
                                "sparse": [cfg.dense_attention_steps + cfg.indexer_warmup_steps, steps]},
                     "log_every": cfg.log_every, "eval_every": cfg.eval_every, "eval_batches": cfg.eval_batches,
                     "checkpoint_every": cfg.checkpoint_every, "keep_checkpoints": cfg.keep_checkpoints,
                     "async_checkpointing": cfg.async_checkpointing, "checkpoint_checksums": cfg.checkpoint_checksums,
                     "progress_bar": not args.no_progress, "max_growth_mib": args.max_growth_mib,
                     "allow": args.allow, "interval_s": args.interval},
        "compiles": {"total": len(mon.compiles), **phases, "unexpected_after_warmup": len(unexpected),
                     "names_after_warmup": sorted({c["fun_name"] for c in late}),
                     "by_name_before_warmup_end": _count([c["fun_name"] for c in mon.compiles if c["phase"] != "after_warmup"]),
                     "events": mon.compiles, "log_compiles": mon.compile_logs},
        "rss_mib": {"start": round(samples[0]["rss"] / MiB, 1),
                    "after_warmup": _r(rss_near(warmup + cfg.log_every)),
                    "quarter": _r(rss_near(steps / 4)), "middle": _r(rss_near(half)),
                    "three_quarters": _r(rss_near(3 * steps / 4)), "last_row": round(mon.rows[-1]["rss"] / MiB, 1),
                    "end_after_close": round(samples[-1]["rss"] / MiB, 1),
                    "peak_sampled": round(float(all_rss.max()), 1), "peak_ru_maxrss": round(ru_max, 1),
                    "second_half_min": round(float(y.min()), 1) if len(y) else None,
                    "second_half_max": round(float(y.max()), 1) if len(y) else None,
                    "slope_second_half_mib_per_1000_steps": round(slope, 3), "fit_second_half": fit,
                    "fit_growth_second_half_mib": round(growth_fit, 2), "n_samples_second_half": int(len(x)),
                    "slope_second_half_rows_only": round(slope_rows, 3),
                    "slope_second_half_bin_medians": round(slope_bins, 3),
                    "slope_second_half_bin_minima": round(slope_floor, 3), "bins_100_steps": binned,
                    "parts": parts},
        "threads": {"after_warmup": threads[min(len(threads) - 1, len([r for r in mon.rows if r["t"] <= t_warm]))],
                    "end": threads[-1], "max": max(threads)},
        "live_arrays": {"first_row": live[0], "end": live[-1], "max": max(live)},
        "gc_objects": {r["step"]: r["gc_objects"] for r in mon.rows if "gc_objects" in r},
        "gc_growth_by_type": gc_growth,
        "tokens_per_s": {"median_row_after_warmup": round(float(np.median(tps)), 1),
                         "mean_row_after_warmup": round(float(np.mean(tps)), 1),
                         "loop_average": round(tokens / max(t_last - t_first, 1e-9), 1)},
        "steps_per_s": round((mon.rows[-1]["step"] - mon.rows[0]["step"]) / max(t_last - t_first, 1e-9), 3),
        "wall_s": {"total": round(wall, 1), "train_call": round(train_wall, 1),
                   "first_row_at": round(t_first, 1), "last_row_at": round(t_last, 1)},
        "loss": {"first_row": round(mon.rows[0]["loss"], 4), "last_row": round(mon.rows[-1]["loss"], 4),
                 "eval": [{"step": e["step"], "loss": round(e["loss"], 4)} for e in mon.evals]},
        "checkpoints": [m["msg"] for m in mon.messages if "checkpoint step" in m["msg"]],
        "env": {"python": platform.python_version(), "jax": __import__("jax").__version__,
                "orbax": __import__("orbax.checkpoint").checkpoint.__version__ if hasattr(
                    __import__("orbax.checkpoint").checkpoint, "__version__") else None,
                "grain": getattr(__import__("grain"), "__version__", None),
                "backend": __import__("jax").default_backend(), "cpus": os.cpu_count(),
                "machine": platform.machine(), "load_avg_end": list(os.getloadavg())},
        "samples": [{"t": round(s["t"], 2), "step": round(s["step"], 1), "src": s["src"],
                     **{k + "_mib": round(s[k] / MiB, 2) for k in ("rss", "anon", "file", "heap", "heap_free") if k in s}}
                    for s in samples],
        "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in mon.rows],
    }


def _near(samples, step, key):
    cand = [s for s in samples if s["src"] in ("row", "bg") and s["step"] >= step and key in s]
    return cand[0][key] / MiB if cand else None


def _r(v):
    return None if v is None else round(v, 1)


def _count(names):
    out = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def plot(rep: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = rep["samples"]
    fig, ax = plt.subplots(figsize=(9, 5.6))
    bg = [(x["step"], x["rss_mib"]) for x in s if x["src"] == "bg"]
    rw = [(x["step"], x["rss_mib"]) for x in s if x["src"] == "row"]
    ev = [(x["step"], x["rss_mib"]) for x in s if x["src"] == "eval"]
    if bg:
        ax.plot(*zip(*bg), lw=0.8, color="tab:blue", label="RSS, every ~1 s")
    if rw:
        ax.plot(*zip(*rw), ".", ms=2.5, color="tab:orange", label="RSS at metrics rows")
    if ev:
        ax.plot(*zip(*ev), "^", ms=6, color="tab:green", label="evaluation")
    for key, col, lab in (("anon", "tab:brown", "RssAnon (heap, arrays)"), ("file", "tab:gray", "RssFile (mapped files)"),
                          ("heap", "tab:olive", "malloc in use"), ("heap_free", "tab:cyan", "malloc free, held")):
        pts = [(x["step"], x[key + "_mib"]) for x in s if x["src"] == "bg" and key + "_mib" in x]
        if pts:
            ax.plot(*zip(*pts), lw=0.6, color=col, alpha=0.8, label=lab)
    ck = [int(m.group(1)) for m in (re.search(r"checkpoint step (\d+)", c) for c in rep["checkpoints"]) if m]
    for i, c in enumerate(ck):
        ax.axvline(c, color="0.7", lw=0.6, ls=":", label="checkpoint" if i == 0 else None)
    events = rep["compiles"]["events"]
    lo = min(x[1] for x in bg + rw) if bg or rw else 0
    for i, c in enumerate(events):
        late = c["phase"] == "after_warmup"
        ax.axvline(c["step"], color="red" if late else "tab:purple", lw=0.8, alpha=0.6,
                   label=("compile after warm-up" if late else "compile (setup / warm-up)")
                   if i == next(j for j, e in enumerate(events) if (e["phase"] == "after_warmup") == late) else None)
    steps, half = rep["steps"], rep["steps"] / 2
    r = rep["rss_mib"]
    if np.isfinite(r["slope_second_half_mib_per_1000_steps"]):
        k, b = r["fit_second_half"]
        ax.plot([half, steps], [k * half + b, k * steps + b], "k--", lw=1,
                label=f"fit, 2nd half: {k * 1000:+.2f} MiB / 1000 steps")
    ax.axvline(rep["warmup_steps"], color="k", lw=0.8, alpha=0.4)
    ax.text(rep["warmup_steps"], lo, " warm-up ends", fontsize=8, va="bottom")
    st = rep["settings"]
    ax.set_title(f"tiny soak: {steps} steps of {st['batch_size']} x {st['seq_len']} tokens; "
                 f"{rep['compiles']['total']} compiles ({rep['compiles']['after_warmup']} after warm-up), "
                 f"peak {r['peak_sampled']:.0f} MiB", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("host memory (MiB)")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rep: dict) -> str:
    c, r, st, tp = rep["compiles"], rep["rss_mib"], rep["settings"], rep["tokens_per_s"]
    lines = [f"soak: {'OK' if rep['ok'] else 'FAILED'}  ({rep['final_step']} steps of the tiny model, "
             f"batch {st['batch_size']} x seq {st['seq_len']} = {st['tokens_per_step']} tokens/step; "
             f"stages at 0/{st['stages']['indexer_warmup'][0]}/{st['stages']['sparse'][0]}, eval every "
             f"{st['eval_every']} ({st['eval_batches']} batches), checkpoint every {st['checkpoint_every']})",
             f"  compiles: {c['total']} total = {c['setup']} setup/first step + {c['warmup']} warm-up (to step "
             f"{rep['warmup_steps']}) + {c['after_warmup']} after warm-up"
             + (f" ({', '.join(c['names_after_warmup'])})" if c["names_after_warmup"] else ""),
             "  compiled before warm-up end: " + ", ".join(f"{k} x{v}" for k, v in c["by_name_before_warmup_end"].items()),
             f"  RSS MiB: start {r['start']}, after warm-up {r['after_warmup']}, 1/4 {r['quarter']}, middle "
             f"{r['middle']}, 3/4 {r['three_quarters']}, last row {r['last_row']}, after close {r['end_after_close']}; "
             f"peak {r['peak_sampled']} (ru_maxrss {r['peak_ru_maxrss']})",
             f"  2nd half: slope {r['slope_second_half_mib_per_1000_steps']:+.2f} MiB/1000 steps -> fitted growth "
             f"{r['fit_growth_second_half_mib']:+.1f} MiB (limit {st['max_growth_mib']}), range "
             f"{r['second_half_min']}-{r['second_half_max']} over {r['n_samples_second_half']} samples; slope of the "
             f"rows only {r['slope_second_half_rows_only']:+.2f}, of 100-step medians "
             f"{r['slope_second_half_bin_medians']:+.2f}, of 100-step minima {r['slope_second_half_bin_minima']:+.2f}",
             "  parts, fitted 2nd-half growth MiB: " + ", ".join(
                 f"{k} {v['fit_growth_second_half_mib']:+.1f} (after warm-up {v['after_warmup']}, middle {v['middle']}, "
                 f"end {v['last_row']}, peak {v['peak']})" for k, v in r["parts"].items()),
             f"  gc-tracked objects grown by type {rep['gc_growth_by_type']}",
             f"  threads {rep['threads']['after_warmup']} -> {rep['threads']['end']} (max {rep['threads']['max']}), "
             f"live jax arrays {rep['live_arrays']['first_row']} -> {rep['live_arrays']['end']} "
             f"(max {rep['live_arrays']['max']}), gc objects {rep['gc_objects']}",
             f"  speed: {tp['median_row_after_warmup']} tokens/s (median row after warm-up), "
             f"{tp['loop_average']} tokens/s loop average, {rep['steps_per_s']} steps/s; wall {rep['wall_s']['total']} s "
             f"(train() {rep['wall_s']['train_call']} s)",
             f"  loss {rep['loss']['first_row']} -> {rep['loss']['last_row']}; eval "
             + ", ".join(f"{e['step']}: {e['loss']}" for e in rep["loss"]["eval"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--ns-iters", type=int, default=1,
                   help="Muon Newton-Schulz iterations (the first N of the preset's 10; 10: the preset's optimizer)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="warm-up ends after this step (default: checkpoint_every, the first checkpoint)")
    p.add_argument("--max-growth-mib", type=float, default=64.0,
                   help="fail when the fitted RSS growth over the second half exceeds this")
    p.add_argument("--allow", default=None, help="regex of function names whose compiles after warm-up are expected")
    p.add_argument("--interval", type=float, default=1.0, help="RSS sampling interval (s)")
    p.add_argument("--set", nargs="*", default=[], help="more key=value overrides of the run config")
    p.add_argument("--workdir", default=None, help="run directory (default: a temporary one, deleted afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (print a line per log row instead)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "soak"))
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    mon = Monitor(args.interval)
    mon.start()
    import jax

    from v4jax.train.checkpoints import latest_step
    from v4jax.train.config import train_preset
    from v4jax.train.loop import train

    args.overrides = schedule(args.steps, args.seq_len, args.batch_size, args.log_every, args.ns_iters) + list(args.set)
    cfg = train_preset("tiny", args.overrides)
    warmup = cfg.checkpoint_every if args.warmup_steps is None else args.warmup_steps
    tmp = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="v4jax-soak-") if tmp else os.path.abspath(args.workdir)
    if not tmp and latest_step(workdir) is not None:
        p.error(f"--workdir {workdir} already holds checkpoints (the run would resume): give an empty directory")
    print(f"soak: {args.steps} steps of tiny, batch {cfg.batch_size} x seq {cfg.seq_len}, on {jax.default_backend()} "
          f"({os.cpu_count()} CPUs); workdir {workdir}; overrides: {' '.join(args.overrides)}",
          flush=True)
    try:
        t0 = time.perf_counter()
        result = train(cfg, workdir, progress=not args.no_progress, log=mon.log, on_log=mon.on_log)
        train_wall = time.perf_counter() - t0
    finally:
        mon.stop()
        if tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - t_start
    rep = analyse(mon, args, cfg, warmup, wall, train_wall, result)
    rep["workdir"] = workdir if (not tmp or args.keep) else None
    rep["stopped_by"] = result.stopped_by
    if result.stopped_by or result.step < args.steps:
        rep["ok"] = False
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(rep, f, indent=1)
    plot(rep, os.path.join(args.out, "rss.png"))
    print(summary(rep))
    for c in rep["compiles"]["events"]:
        print(f"  compile {c['phase']:>12} t={c['t']:7.1f}s step~{c['step']:7.1f} (after row {c['after_row']}) "
              f"{c['seconds']:7.3f}s [{c['thread']}] {c['fun_name']}")
    print(f"wrote {os.path.join(args.out, 'soak.json')} and {os.path.join(args.out, 'rss.png')}")
    if result.stopped_by:
        print(f"soak: INCOMPLETE: train() was stopped by {result.stopped_by} at step {result.step} of {args.steps}")
        return 2
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
