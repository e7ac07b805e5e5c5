"""Decode throughput of v4jax vs Hugging Face transformers on the SAME weights (tiny preset).

    .venv/bin/python experiments/decode_bench.py [--contexts 1024 8192] [--new-tokens 32] \
        [--torch-python /work/hfvenv/bin/python] [--batch 1]

1. Random ``tiny`` weights: ``v4jax.V4Model.init(preset("tiny", max_seq_len=max(C) + N), seed=0)``,
   written with ``model.save(tmpdir)`` (official naming + a config.json transformers reads).
2. For each context C, prompt = random ids ``[B, C]`` (the same array for both sides):
   * v4jax: ``model.prefill(prompt, max_len=C + N)`` is called twice; the second call is the
     prefill time, (first - second) is its compile time. Then greedy decode with
     ``model.decode_step(tok, cache)``: step 1 is a warm-up (compiles the [B, 1] shape),
     steps 2..N are timed (each step = ``model.decode_step(tok, cache)``: the one-token cached
     path with the argmax fused and the cache donated, + copy of the token to the host).
   * transformers: ``experiments/_hf_decode_worker.py`` under ``--torch-python`` (a separate
     process, JSON on stdout): ``DeepseekV4ForCausalLM.from_pretrained(dir, dtype=float32)``,
     one ``use_cache=True`` forward over the prompt (prefill), then N single-token steps on
     ``past_key_values`` feeding the argmax, step 1 warm-up, steps 2..N timed;
     ``torch.set_num_threads(os.cpu_count())``.
   Both sides produce N + 1 greedy tokens per sequence (argmax of the prefill's last logits,
   then one per step); the script reports how many agree (it does not assert).
tok/s = B * (N - 1) / (time of steps 2..N). The two sides run one after the other, never at
the same time; anything else running on the machine (e.g. a test suite) skews both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import v4jax

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_hf_decode_worker.py")
# the torch + transformers interpreter of this machine, if present (else the old default)
DEFAULT_TORCH_PYTHON = ("/work/hfvenv/bin/python" if os.path.exists("/work/hfvenv/bin/python")
                        else "/work/fxvenv/bin/python")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_info() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs"


def load_avg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def probe_torch(torch_python: str | None) -> tuple[bool, str]:
    """Can ``torch_python`` import torch + transformers' DeepseekV4ForCausalLM?"""
    if not torch_python:
        return False, "no --torch-python given"
    if not (os.path.isfile(torch_python) and os.access(torch_python, os.X_OK)):
        return False, f"--torch-python {torch_python!r} is not an executable file"
    code = ("import torch, transformers; from transformers import DeepseekV4ForCausalLM; "
            "print(torch.__version__, transformers.__version__)")
    try:
        r = subprocess.run([torch_python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{torch_python}: {e}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"{torch_python} cannot import torch/transformers/DeepseekV4ForCausalLM: {last}"
    torch_v, tf_v = r.stdout.split()
    return True, f"torch {torch_v}, transformers {tf_v} ({torch_python})"


def bench_v4jax(model: v4jax.V4Model, prompt: np.ndarray, n_new: int) -> dict:
    B, C = prompt.shape
    ids = jnp.asarray(prompt)

    def prefill():
        t = time.perf_counter()
        logits, cache = model.prefill(ids, max_len=C + n_new)
        logits = jax.block_until_ready(logits)
        jax.block_until_ready(cache)
        return time.perf_counter() - t, logits, cache

    first_s, _, _ = prefill()  # compile + run
    prefill_s, logits, cache = prefill()  # run only
    tok = np.asarray(jnp.argmax(logits[:, -1], -1)).astype(np.int32)  # [B]
    del logits
    tokens = [tok]
    step_s = []
    for _ in range(n_new):
        t = time.perf_counter()
        nxt, _, cache = model.decode_step(tok, cache)   # greedy, cache donated
        tok = np.asarray(nxt)  # host copy = sync
        step_s.append(time.perf_counter() - t)
        tokens.append(tok)
    jax.block_until_ready(cache)
    timed = step_s[1:]
    decode_s = sum(timed)
    median = sorted(timed)[(len(timed) - 1) // 2]
    return dict(
        ok=True,
        prefill_s=prefill_s,
        prefill_compile_s=max(0.0, first_s - prefill_s),
        warmup_s=step_s[0],
        decode_compile_s=max(0.0, step_s[0] - median),
        decode_steps=len(timed),
        decode_s=decode_s,
        tok_s=B * len(timed) / decode_s,
        step_ms_median=1e3 * median,
        step_ms_min=1e3 * min(timed),
        tokens=np.stack(tokens, 1),
    )


def bench_hf(torch_python: str, ckpt: str, prompt: np.ndarray, n_new: int, workdir: str, timeout: float) -> dict:
    path = os.path.join(workdir, f"prompt_{prompt.shape[0]}x{prompt.shape[1]}.npy")
    np.save(path, prompt)
    cmd = [torch_python, WORKER, "--ckpt", ckpt, "--prompt", path, "--new-tokens", str(n_new),
           "--threads", str(os.cpu_count() or 1)]
    res = run_worker(cmd, timeout, "transformers worker")
    if not res.get("ok", True):
        return res
    res["tokens"] = np.asarray(res["tokens"], np.int32)
    return res


def run_worker(cmd: list[str], timeout: float, what: str) -> dict:
    """Run a torch-side worker; its last stdout line is one JSON object. Failures come back as
    ``{"ok": False, "error": ...}`` (timeout, exit code with the stderr tail, no JSON)."""
    env = dict(os.environ)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"{what} exceeded its timeout of {timeout:.0f}s (infeasible here)")
    except OSError as e:
        return dict(ok=False, error=f"{what}: {e}")
    wall = time.perf_counter() - t
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-8:])
        why = "killed (out of memory?)" if r.returncode in (-9, 137) else f"exit code {r.returncode}"
        return dict(ok=False, error=f"{what} failed ({why}):\n{tail}")
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return dict(ok=False, error=f"{what} printed no JSON; stdout tail: {r.stdout[-300:]!r}")
    res["wall_s"] = wall
    return res


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """'matching/total' over all positions, plus the first step where a row diverges."""
    same = a == b
    total = same.size
    text = f"{int(same.sum())}/{total}"
    bad = np.argwhere(~same)
    if len(bad):
        text += f" (first mismatch at step {int(bad[:, 1].min())})"
    return text


def fmt(x, spec=".1f", missing="-"):
    return missing if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps per context (>= 2; step 1 is warm-up)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON,
                    help="a Python with torch + transformers (DeepseekV4ForCausalLM); '' to skip")
    ap.add_argument("--hf-timeout", type=float, default=900.0,
                    help="seconds allowed for one transformers context (load + prefill + decode)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2")
    if args.batch < 1 or min(args.contexts) < 1:
        ap.error("--batch and --contexts must be >= 1")

    t_start = time.perf_counter()
    print(f"host: {platform.node()}  {cpu_info()}  load avg at start {load_avg()}")
    print(f"v4jax {v4jax.__version__}, jax {jax.__version__}, devices {[f'{d.platform}:{d.device_kind}' for d in jax.devices()]}")
    have_hf, hf_note = probe_torch(args.torch_python)
    print(f"transformers side: {hf_note if have_hf else 'SKIPPED - ' + hf_note}")

    N, B = args.new_tokens, args.batch
    cfg = v4jax.preset("tiny", max_seq_len=max(args.contexts) + N)
    t = time.perf_counter()
    model = v4jax.V4Model.init(cfg, seed=args.seed)
    jax.block_until_ready(model.variables)
    print(f"model: {model}, max_seq_len {cfg.max_seq_len}, dtype {cfg.dtype}, runtime "
          f"{model.runtime}; init {time.perf_counter() - t:.1f}s")
    print(f"batch {B}, new tokens {N} per context (1 warm-up + {N - 1} timed steps), greedy\n")

    workdir = tempfile.mkdtemp(prefix="decode_bench_")
    rows = []
    try:
        ckpt = os.path.join(workdir, "ckpt")
        model.save(ckpt)
        rng = np.random.default_rng(args.seed)
        for C in args.contexts:
            prompt = rng.integers(0, cfg.vocab_size, (B, C)).astype(np.int32)
            t = time.perf_counter()
            jx = bench_v4jax(model, prompt, N)
            print(f"[C={C}] v4jax: prefill {jx['prefill_s']:.2f}s (+{jx['prefill_compile_s']:.1f}s compile), "
                  f"decode {jx['step_ms_median']:.1f} ms/step median, {jx['tok_s']:.1f} tok/s, "
                  f"decode compile ~{jx['decode_compile_s']:.1f}s; wall {time.perf_counter() - t:.1f}s, "
                  f"peak RSS so far {peak_rss_gb():.1f} GB", flush=True)
            hf = None
            if have_hf:
                hf = bench_hf(args.torch_python, ckpt, prompt, N, workdir, args.hf_timeout)
                if hf["ok"]:
                    print(f"[C={C}] transformers: prefill {hf['prefill_s']:.2f}s, decode {hf['step_ms_median']:.1f} "
                          f"ms/step median, {hf['tok_s']:.1f} tok/s; wall {hf['wall_s']:.1f}s, peak RSS "
                          f"{hf['peak_rss_gb']:.1f} GB, attn={hf['attn_implementation']} "
                          f"experts={hf['experts_implementation']}, load missing/unexpected keys "
                          f"{len(hf['missing_keys'])}/{len(hf['unexpected_keys'])}", flush=True)
                else:
                    print(f"[C={C}] transformers: FAILED - {hf['error']}", flush=True)
            rows.append((C, jx, hf))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print("\n| context | v4jax tok/s | transformers tok/s | ratio (v4jax/transformers) | v4jax prefill s | transformers prefill s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for C, jx, hf in rows:
        ok = hf is not None and hf["ok"]
        hf_tok = hf["tok_s"] if ok else None
        ratio = jx["tok_s"] / hf_tok if ok else None
        hf_cell = fmt(hf_tok) if ok else ("skipped" if hf is None else "failed")
        print(f"| {C} | {jx['tok_s']:.1f} | {hf_cell} | {fmt(ratio, '.2f')} | {jx['prefill_s']:.2f} | "
              f"{fmt(hf['prefill_s'] if ok else None, '.2f')} |")

    print("\n| context | v4jax ms/step | transformers ms/step | v4jax compile s (prefill + decode) | greedy tokens matching |")
    print("|---:|---:|---:|---:|---:|")
    for C, jx, hf in rows:
        ok = hf is not None and hf["ok"]
        match = agreement(jx["tokens"], hf["tokens"]) if ok and hf["tokens"].shape == jx["tokens"].shape else "-"
        print(f"| {C} | {jx['step_ms_median']:.1f} | {fmt(hf['step_ms_median'] if ok else None)} | "
              f"{jx['prefill_compile_s']:.1f} + {jx['decode_compile_s']:.1f} | {match} |")

    if not have_hf:
        print(f"\ntransformers was skipped: {hf_note}")
    for C, _, hf in rows:
        if hf is not None and not hf["ok"]:
            print(f"\ntransformers at context {C}: {hf['error']}")
    print(f"\nms/step = median over the timed steps; tok/s = batch x timed steps / their total time. "
          f"Load avg at end {load_avg()} ({os.cpu_count()} CPUs; other processes skew both sides). "
          f"Total wall {time.perf_counter() - t_start:.0f}s.")


if __name__ == "__main__":
    main()
