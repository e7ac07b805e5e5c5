"""Where the time of a train step or a decode step goes, by model component (issue #10).

    .venv/bin/python experiments/profile_step.py train  [--preset tiny] [--batch 8] [--seq 256] \
        [--optimizer adamw|muon] [--mtp off|on] [--moe auto] [--steps 3] [--label after]
    .venv/bin/python experiments/profile_step.py decode [--context 1024] [--batch 1] [--steps 10]

Method: the jitted step is compiled once, run warm, then traced with ``jax.profiler`` for
``--steps`` steps. On XLA:CPU every executed HLO instruction (thunk) is one trace event carrying
its ``hlo_op`` name; the compiled module's text maps that name to the instruction's
``op_name`` metadata, which holds the Flax module path (``stack_2/layer_1/attn/indexer/...``) and
``transpose(jvp(...))`` for the backward pass. ``COMPONENTS`` (regexes on that path, first match
wins) turns it into the table. Times are summed thunk durations ("op time"): with XLA running
independent thunks and the matmuls' inner loops on both cores, op time exceeds the wall time, so
the table gives shares of op time next to the measured wall time per step. XLA's own cost analysis
(FLOPs, bytes) and memory analysis of the compiled step are printed too.

To profile another checkout (e.g. the code before this issue) run this file with that checkout
first on ``PYTHONPATH``; it only uses APIs that existed before (``make_train_step``, ``extend``).
Writes ``<out>/<job>_<label>.json`` and the Perfetto trace under ``<out>/trace_<job>_<label>/``
(``--keep-trace``; open ``*.trace.json.gz`` in ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

# (component, regex on the op_name metadata); first match wins. Order matters: the optimizer and
# the loss live outside the Transformer's jvp; the indexer's own compressor counts as indexer.
COMPONENTS = [
    ("optimizer and update", r"opt_state|^jit\(train_step\)/(?!jvp|transpose)(?!.*Transformer)"),
    ("indexer", r"/(attn|attn\.extend)/indexer"),
    ("compressors", r"/(attn|attn\.extend)/compressor"),
    ("attention projections", r"attn\._(project|output)|/(wq_a|wq_b|wkv|wo_b|q_norm|kv_norm)/"),
    ("attention core", r"/(attn|attn\.extend)/"),
    ("mHC", r"hc_attn|hc_ffn|hc_head|stream_mix|btn,btnd|btij,btid"),
    ("router", r"/ffn/gate/"),
    ("routed experts", r"/ffn/experts/"),
    ("shared expert", r"/ffn/shared_experts/"),
    ("MoE statistics", r"/ffn/"),
    ("norms", r"attn_norm|ffn_norm|/norm/"),
    ("MTP block", r"mtp_0"),
    ("embedding, head, loss", r"embed|/head/|logits|log_softmax|logsumexp|take_along_axis|^jit\(train_step\)/(jvp\(\)|transpose\(jvp\(\)\))/"),
    ("layer loop (scan slicing, stacking)", r"dynamic_update_index_in_dim|dynamic_index_in_dim|/while"),
]


def classify(op_name: str) -> str:
    for name, rx in COMPONENTS:
        if re.search(rx, op_name):
            return name
    return "other (copies, selects, unattributed)"


def op_metadata(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> op_name metadata, from a compiled module's text."""
    pat = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name="((?:[^"\\]|\\.)*)"', re.M)
    return {m.group(1): m.group(2) for m in pat.finditer(hlo_text)}


def trace(fn, args, steps: int, keep: str | None) -> tuple[list, float]:
    """Run ``fn(*args)`` ``steps`` times under the profiler; (thunk events, wall s per step)."""
    d = keep or tempfile.mkdtemp(prefix="v4prof_")
    jax.profiler.start_trace(d)
    t = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(fn(*args))
    wall = (time.perf_counter() - t) / steps
    jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(d, "plugins", "profile", "*", "*.trace.json.gz")))
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
    return events, wall


def attribute(events: list, meta: dict[str, str], module_prefix: str, steps: int) -> dict:
    comp = collections.Counter()
    fwd_bwd = collections.Counter()
    per_op = collections.Counter()
    n = 0
    for e in events:
        a = e.get("args", {})
        if "hlo_op" not in a or not a.get("hlo_module", "").startswith(module_prefix):
            continue
        op = meta.get(a["hlo_op"], "")
        c = classify(op)
        comp[c] += e["dur"]
        per_op[(a["hlo_op"], op)] += e["dur"]
        fwd_bwd[(c, "backward" if "transpose(" in op else "forward")] += e["dur"]
        n += 1
    total = sum(comp.values())
    rows = {c: {"op_ms": v / 1e3 / steps, "share": v / total,
                "forward_ms": fwd_bwd[(c, "forward")] / 1e3 / steps,
                "backward_ms": fwd_bwd[(c, "backward")] / 1e3 / steps}
            for c, v in comp.most_common()}
    top = [{"hlo_op": h, "op_name": o, "op_ms": v / 1e3 / steps} for (h, o), v in per_op.most_common(400)]
    return {"op_ms_per_step": total / 1e3 / steps, "thunks_per_step": n / steps, "components": rows,
            "top_ops": top}


def compiled_costs(compiled) -> dict:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    ma = compiled.memory_analysis()
    return {"xla_flops": float(ca.get("flops", 0.0)), "xla_bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            "temp_bytes": getattr(ma, "temp_size_in_bytes", None),
            "argument_bytes": getattr(ma, "argument_size_in_bytes", None)}


def build_train(a):
    import optax

    import v4jax
    from v4jax.train.config import train_preset
    from v4jax.train.step import init_state, make_train_step

    tc = train_preset(a.preset)
    mcfg = tc.model if a.mtp == "on" else tc.model.replace(n_mtp_layers=0)
    if a.seq + 1 > mcfg.max_seq_len:
        mcfg = mcfg.replace(max_seq_len=a.seq + 1)
    rt = tc.runtime if a.moe is None else dataclasses.replace(tc.runtime, moe=a.moe)
    tc = dataclasses.replace(tc, model=mcfg, runtime=rt, seq_len=a.seq, batch_size=a.batch)
    if a.optimizer == "adamw":
        tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    else:
        from v4jax.train.optimizer import make_optimizer

        tx = make_optimizer(tc.optim, v4jax.V4Model.init(tc.model, seed=0).params)
    state = init_state(tc, tx)
    tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, (a.batch, a.seq + 1)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones((a.batch, a.seq + 1), jnp.int32)}
    step = make_train_step(tc, tx, stage="sparse")
    compiled = step.lower(state, batch).compile()
    holder = {"state": state}

    def run(b):
        holder["state"], m = compiled(holder["state"], b, jnp.float32(jnp.inf))   # loss_limit: none
        return m

    desc = dict(preset=a.preset, batch=a.batch, seq=a.seq, optimizer=a.optimizer, mtp=a.mtp,
                runtime=dataclasses.asdict(rt) if dataclasses.is_dataclass(rt) else str(rt), stage="sparse")
    return compiled, run, (batch,), "jit_train_step", desc, a.batch * a.seq


def build_decode(a):
    import v4jax

    cfg = v4jax.preset(a.preset, max_seq_len=a.context + 64)
    m = v4jax.V4Model.init(cfg, seed=0) if a.moe is None else v4jax.V4Model.init(cfg, seed=0, moe=a.moe)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.context)), jnp.int32)
    logits, cache = m.prefill(ids, max_len=a.context + 32)
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    holder = {"cache": cache}
    if hasattr(m, "decode_step"):   # the one-token step of issue #10 (cache donated)
        key = jax.random.key(0)
        compiled = m._decode.lower(m.variables, tok, cache, key, temperature=0.0, top_p=1.0).compile()

        def run(t):
            nxt, _, holder["cache"] = compiled(m.variables, t, holder["cache"], key)
            return nxt
        prefix, path = "jit__pure_decode", "V4Model.decode_step"
    else:   # before: the general cached chunk with T = 1
        nv = jnp.ones((a.batch,), jnp.int32)
        compiled = m._extend.lower(m.variables, tok[:, None], cache, nv).compile()

        def run(t):
            logits, holder["cache"] = compiled(m.variables, t[:, None], holder["cache"], nv)
            return jnp.argmax(logits[:, -1], -1)
        prefix, path = "jit__pure_extend", "V4Model.extend(tok[:, None])"
    desc = dict(preset=a.preset, batch=a.batch, context=a.context, path=path,
                runtime=dataclasses.asdict(m.runtime) if hasattr(m, "runtime") else None)
    return compiled, run, (tok,), prefix, desc, a.batch


# v4jax.host.TUNABLES, kept here so that this file can profile a checkout that predates v4jax.host
_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=17179869184:"
             "glibc.malloc.hugetlb=1")


def _reexec_tuned() -> None:
    """As ``v4jax.host.reexec_tuned``: the profile of the process the CLIs run (malloc tuned)."""
    tun = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc" in tun or os.environ.get("V4JAX_HOST_TUNING") == "0" or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tun}:{_TUNABLES}" if tun else _TUNABLES)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv=None) -> int:
    if argv is None:
        _reexec_tuned()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=("train", "decode"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (train), 1 (decode)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    ap.add_argument("--mtp", choices=("on", "off"), default="off")
    ap.add_argument("--moe", default=None, help="Runtime.moe (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="traced steps (default 3 train, 10 decode)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile"))
    ap.add_argument("--keep-trace", action="store_true")
    ap.add_argument("--top", type=int, default=0, help="also print the N slowest HLO instructions")
    a = ap.parse_args(argv)
    a.batch = a.batch or (8 if a.job == "train" else 1)
    a.steps = a.steps or (3 if a.job == "train" else 10)

    import v4jax

    t = time.perf_counter()
    compiled, run, args, prefix, desc, tokens = (build_train if a.job == "train" else build_decode)(a)
    build_s = time.perf_counter() - t
    for _ in range(a.warmup):
        jax.block_until_ready(run(*args))
    ts = []
    for _ in range(max(3, a.steps)):
        t = time.perf_counter()
        jax.block_until_ready(run(*args))
        ts.append(time.perf_counter() - t)
    wall = sorted(ts)[len(ts) // 2]
    os.makedirs(a.out, exist_ok=True)
    keep = os.path.join(a.out, f"trace_{a.job}_{a.label}") if a.keep_trace else None
    events, traced_wall = trace(run, args, a.steps, keep)
    res = attribute(events, op_metadata(compiled.as_text()), prefix, a.steps)
    res.update(job=a.job, label=a.label, v4jax_path=os.path.dirname(v4jax.__file__), jax=jax.__version__,
               build_and_compile_s=build_s, wall_ms_median=1e3 * wall, traced_wall_ms=1e3 * traced_wall,
               tokens_per_step=tokens, tokens_per_s=tokens / wall, load_avg=os.getloadavg(),
               date=time.strftime("%Y-%m-%d %H:%M:%S"), glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), **desc, **compiled_costs(compiled))
    path = os.path.join(a.out, f"{a.job}_{a.label}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{a.job} [{a.label}] {desc}: wall {1e3 * wall:.1f} ms/step ({tokens / wall:.0f} tok/s), "
          f"op time {res['op_ms_per_step']:.0f} ms/step, {res['thunks_per_step']:.0f} thunks/step, "
          f"XLA {res['xla_flops'] / 1e9:.1f} GFLOP, {res['xla_bytes_accessed'] / 1e9:.2f} GB accessed")
    print("| component | op ms/step | share | forward ms | backward ms |\n|---|---:|---:|---:|---:|")
    for c, r in res["components"].items():
        print(f"| {c} | {r['op_ms']:.1f} | {100 * r['share']:.1f}% | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} |")
    for r in res["top_ops"][:a.top]:
        print(f"{r['op_ms']:8.1f} ms  {r['hlo_op']:<28} {r['op_name'][-110:]}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
