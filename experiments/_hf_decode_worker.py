"""Torch side of ``experiments/decode_bench.py`` (run under a Python that has torch +
transformers; must not import jax or v4jax).

    python experiments/_hf_decode_worker.py --ckpt DIR --prompt ids.npy --new-tokens N

Loads ``DIR`` with ``DeepseekV4ForCausalLM.from_pretrained`` (fp32, CPU), runs the prompt once
with ``use_cache=True`` (prefill, timed), then greedy-decodes N single-token steps against the
returned ``past_key_values``: step 1 is a warm-up, steps 2..N are timed. Prints ONE JSON object
on stdout (everything else goes to stderr):

    tokens [B, N+1]   argmax of the prefill's last logits, then the argmax after every step
    prefill_s, warmup_s, decode_s (steps 2..N), decode_steps, tok_s = B * decode_steps / decode_s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--prompt", required=True, help=".npy int array [B, C]")
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (one warm-up step + at least one timed step)")

    import numpy as np
    import torch
    import transformers
    from transformers import DeepseekV4ForCausalLM

    assert "jax" not in sys.modules and "v4jax" not in sys.modules
    torch.set_num_threads(args.threads)
    prompt = torch.from_numpy(np.load(args.prompt).astype(np.int64))
    B, C = prompt.shape
    N = args.new_tokens

    t = time.perf_counter()
    model, info = DeepseekV4ForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32, output_loading_info=True)
    model.eval()
    load_s = time.perf_counter() - t
    missing, unexpected = list(info.get("missing_keys", [])), list(info.get("unexpected_keys", []))

    with torch.inference_mode():
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill_s = time.perf_counter() - t
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1)  # [B]
        del out
        tokens = [tok]
        prefill_rss = peak_rss_gb()

        step_s = []
        for _ in range(N):
            t = time.perf_counter()
            out = model(input_ids=tok[:, None], past_key_values=past, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            step_s.append(time.perf_counter() - t)  # argmax included: .item()-free, CPU tensors are synchronous
            past = out.past_key_values
            tokens.append(tok)

    decode_s = sum(step_s[1:])
    result = dict(
        ok=True,
        batch=B, context=C, new_tokens=N,
        load_s=load_s,
        prefill_s=prefill_s,
        warmup_s=step_s[0],
        decode_steps=N - 1,
        decode_s=decode_s,
        tok_s=B * (N - 1) / decode_s,
        step_ms_min=1e3 * min(step_s[1:]),
        step_ms_median=1e3 * sorted(step_s[1:])[(N - 1) // 2],
        tokens=torch.stack(tokens, 1).tolist(),
        missing_keys=missing,
        unexpected_keys=unexpected,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        experts_implementation=getattr(model.config, "_experts_implementation", None),
        peak_rss_gb_after_prefill=prefill_rss,
        peak_rss_gb=peak_rss_gb(),
        threads=torch.get_num_threads(),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=transformers.__version__),
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
