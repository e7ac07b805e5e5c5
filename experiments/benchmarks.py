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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # experiments/: decode_bench, bench/

from bench.common import DEFAULT_OUT, DEFAULT_TORCH_PYTHON, PASSTHROUGH, ROOT  # noqa: E402
from bench.decode import cmd_decode  # noqa: E402
from bench.passthrough import run_passthrough  # noqa: E402
from bench.peak import cmd_peak  # noqa: E402
from bench.suite import cmd_all  # noqa: E402
from bench.train import cmd_train  # noqa: E402

from v4jax import host  # noqa: E402
from v4jax.runtime import MOE_IMPLS  # noqa: E402


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
    if argv is None:   # as a script: the process (and the transformers workers it starts) as the CLIs run
        host.reexec_tuned()
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
