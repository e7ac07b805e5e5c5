"""FP4 quantisation-aware training of the routed experts on ``tiny`` (issue #22 item 2, spec 8).

    taskset -c 1 .venv/bin/python experiments/qat/qat_tiny.py            # the reported measurement
    .venv/bin/python experiments/qat/qat_tiny.py --steps 20 --out /tmp/q # a quick try

Trains the ``tiny`` run preset twice with ``v4jax.train.loop.train`` (the ``v4jax-train`` loop:
same data order, same seed, same initial weights, same steps and LR schedule, each from a fresh
workdir), then evaluates on the same validation batches:

* ``baseline``: ``model.qat=none``, its float32 weights;
* ``qat``: ``model.qat=fp4_experts`` (routed experts fake-quantized to FP4 e2m1 with 1 x 32 e8m0
  scales in the forward, straight-through gradient), evaluated with the FP4-rounded experts: the
  values a checkpoint exported with ``save(quantize="official")`` holds, and exactly what the QAT
  forward computes (checked against the loop's own fake-quantized evaluation, on its batches);
* ``ptq``: the baseline's weights with the routed experts replaced by
  ``dequantize(quantize(w, "fp4"))`` after training (post-training quantisation);
* ``qat_master``: the QAT run's float32 master weights, unrounded (for reference).

Reports the final validation losses and the gaps ``qat`` / ``ptq`` vs ``baseline`` in %, and
writes ``qat_tiny.json`` and ``qat_tiny.txt`` under ``--out`` (default experiments/results/qat).
The curriculum is the tiny preset's, scaled to ``--steps`` (dense CSA ~18%, indexer warm-up ~9%,
cosine decay from ~73%, as 20 / 10 / 80 of its 110 steps). XLA compiles go to a fresh persistent
cache under the workdir, so the evaluation reuses the baseline loop's compiled eval step (a cold
measurement otherwise)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)


def schedule(steps: int, lr: float, seq_len: int, batch_size: int, eval_batches: int) -> list[str]:
    """Overrides of the tiny preset for a run of ``steps`` steps (its 110-step recipe, scaled)."""
    dense = max(1, round(steps * 20 / 110))
    warm = max(1, round(steps * 10 / 110))
    decay = max(dense + warm, round(steps * 80 / 110))
    return [f"total_steps={steps}", f"optim.total_steps={steps}", f"optim.decay_start={decay}",
            f"optim.warmup_steps={min(10, max(1, steps // 11))}", f"optim.peak_lr={lr}",
            f"optim.final_lr={lr / 10:.6g}", f"dense_attention_steps={dense}", f"indexer_warmup_steps={warm}",
            f"seq_len={seq_len}", f"batch_size={batch_size}", f"log_every={max(1, steps // 10)}",
            f"eval_every={steps}", f"eval_batches={eval_batches}", f"checkpoint_every={steps}",
            "keep_checkpoints=1", "async_checkpointing=false"]


def round_experts(params):
    """``params`` with every weight stored FP4 in the checkpoint (the routed experts, as
    ``v4jax.layers.quantized.WEIGHT_FORMATS`` names them) replaced by ``dequantize(quantize(w))``."""
    import flax.traverse_util as tu
    import jax

    from v4jax.layers import quantized as qw

    q = jax.jit(lambda w, layout: qw.dequantize(qw.quantize(w, "fp4", layout), w.dtype), static_argnums=1)
    flat = tu.flatten_dict(params, sep="/")
    out, n = {}, 0
    for k, w in flat.items():
        wf = qw.weight_format(k)
        if wf is not None and wf[0] in qw.QAT_FORMATS["fp4_experts"]:
            out[k], n = q(w, wf[1]), n + 1
        else:
            out[k] = w
    return tu.unflatten_dict(out, sep="/"), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=52, help="training steps of each run (default 52)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak LR (the tiny preset's 3e-3)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches of the final evaluation "
                    "(the tiny preset's 8)")
    ap.add_argument("--loop-eval-batches", type=int, default=2, help="validation batches of the loop's own "
                    "evaluations (steps 0 and last; the first of the final evaluation's)")
    ap.add_argument("--set", nargs="*", default=[], help="more key=value overrides of both runs")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "experiments", "runs", "qat_tiny"))
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "qat"))
    a = ap.parse_args()
    t_start = time.perf_counter()

    if os.path.isdir(a.workdir):
        shutil.rmtree(a.workdir)             # fresh runs (train() would resume a finished one)
    os.makedirs(a.workdir)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(a.workdir, "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from v4jax.checkpoint import restore_variables
    from v4jax.train.checkpoints import checkpoint_manager
    from v4jax.train.config import train_preset
    from v4jax.train.loop import evaluate, train
    from v4jax.train.step import make_eval_step

    overrides = schedule(a.steps, a.lr, a.seq_len, a.batch_size, a.loop_eval_batches) + list(a.set)
    cfgs = {"baseline": train_preset("tiny", overrides),
            "qat": train_preset("tiny", overrides + ["model.qat=fp4_experts"])}
    runs, variables = {}, {}
    for name, cfg in cfgs.items():
        wd = os.path.join(a.workdir, name)
        t = time.perf_counter()
        res = train(cfg, wd, progress=False, log=lambda m, name=name: print(f"[{name}] {m}", flush=True))
        wall = time.perf_counter() - t
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        train_rows = [r for r in rows if not r.get("eval")]
        evals = [r for r in rows if r.get("eval")]
        runs[name] = {"wall_s": round(wall, 1), "steps": res.step, "skipped_steps": res.skipped_steps,
                      "spikes": res.spikes, "loop_eval_loss": res.eval_loss,
                      "loop_eval_loss_step0": evals[0]["loss"] if evals else None,
                      "final_train_lm_loss": train_rows[-1]["lm_loss"] if train_rows else None,
                      "tokens_per_s_last": train_rows[-1]["tokens_per_s"] if train_rows else None,
                      "lm_loss_curve": [[r["step"], round(r["lm_loss"], 4)] for r in train_rows]}
        mngr = checkpoint_manager(wd, create=False)
        variables[name] = restore_variables(mngr, res.step, cfg.model)
        mngr.close()
        print(f"[{name}] {res.step} steps in {wall:.0f} s; loop's final validation loss {res.eval_loss:.4f}", flush=True)

    # every evaluation through the plain model (qat none), one compiled eval step, the same batches
    base_cfg = cfgs["baseline"]
    stage = base_cfg.stage(a.steps - 1)
    eval_fn = make_eval_step(base_cfg)

    def ev(params, buffers, n=a.eval_batches) -> float:
        return evaluate(base_cfg, params, buffers, stage, eval_fn, max_batches=n)["loss"]

    t = time.perf_counter()
    b, q = variables["baseline"], variables["qat"]
    ptq_params, n_rounded = round_experts(b["params"])
    qat_params, _ = round_experts(q["params"])
    losses = {"baseline": ev(b["params"], b["buffers"]), "qat": ev(qat_params, q["buffers"]),
              "ptq": ev(ptq_params, b["buffers"]), "qat_master": ev(q["params"], q["buffers"])}
    # the loop evaluated the QAT run with its own (fake-quantized) forward on the first batches
    qat_check = ev(qat_params, q["buffers"], a.loop_eval_batches)
    eval_wall = time.perf_counter() - t
    consistent = abs(qat_check - runs["qat"]["loop_eval_loss"]) <= 1e-5 * abs(qat_check)
    gap = lambda k: 100.0 * (losses[k] - losses["baseline"]) / losses["baseline"]
    total = time.perf_counter() - t_start
    report = {
        "what": "tiny preset, baseline vs FP4 QAT of the routed experts vs PTQ (issue #22 item 2)",
        "command": " ".join(["taskset -c " + ",".join(map(str, sorted(os.sched_getaffinity(0))))]
                            + [os.path.relpath(sys.executable, ROOT)] + [os.path.relpath(sys.argv[0], ROOT)]
                            + sys.argv[1:]),
        "steps": a.steps, "lr": a.lr, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "tokens_per_step": a.seq_len * a.batch_size, "eval_batches": a.eval_batches,
        "loop_eval_batches": a.loop_eval_batches,
        "eval_tokens": a.eval_batches * a.batch_size * a.seq_len, "eval_stage": stage,
        "overrides": overrides, "rounded_leaves": n_rounded,
        "val_loss": {k: round(v, 5) for k, v in losses.items()},
        "gap_pct": {"qat_vs_baseline": round(gap("qat"), 3), "ptq_vs_baseline": round(gap("ptq"), 3),
                    "qat_master_vs_baseline": round(gap("qat_master"), 3)},
        "qat_eval_equals_loop_fake_quant_eval": consistent, "qat_eval_first_batches": qat_check,
        "runs": runs, "eval_wall_s": round(eval_wall, 1), "total_wall_s": round(total, 1),
        "host": {"cpus_allowed": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
                 "machine": platform.machine(), "jax": jax.__version__, "backend": jax.default_backend()},
    }
    lines = [
        f"tiny, {a.steps} steps x {a.batch_size} x {a.seq_len} tokens, peak LR {a.lr}, same data/seed/init; "
        f"validation: {a.eval_batches} batches ({report['eval_tokens']} tokens), stage {stage!r}",
        f"  baseline (qat none, fp32 weights)          {losses['baseline']:.4f}",
        f"  QAT fp4_experts (FP4-rounded experts)      {losses['qat']:.4f}   gap {gap('qat'):+.2f}%",
        f"  PTQ (baseline, experts -> FP4 after)       {losses['ptq']:.4f}   gap {gap('ptq'):+.2f}%",
        f"  QAT master weights (unrounded, reference)  {losses['qat_master']:.4f}   gap {gap('qat_master'):+.2f}%",
        f"  QAT eval == the loop's fake-quantized eval: {consistent} "
        f"(first {a.loop_eval_batches} batches: {qat_check:.6f} vs {runs['qat']['loop_eval_loss']:.6f})",
        f"  wall: baseline {runs['baseline']['wall_s']:.0f} s, QAT {runs['qat']['wall_s']:.0f} s, "
        f"evals {eval_wall:.0f} s, total {total:.0f} s on {report['host']['cpus_allowed']} CPU(s)",
    ]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "qat_tiny.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(a.out, "qat_tiny.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if consistent else 1


if __name__ == "__main__":
    sys.exit(main())
