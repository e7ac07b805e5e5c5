"""``v4jax-generate``: load a checkpoint and generate, streaming tokens as they come.

    v4jax-generate CKPT_DIR --prompt "Hello" [--max-new-tokens 64] [--temperature 0] [--top-p 1]
    v4jax-generate CKPT_DIR --prompt-ids "0 17 42"

CKPT_DIR is a ``transformers``-format or official-naming directory (``config.json`` +
``*.safetensors``), or an orbax workdir (``v4jax.checkpoint``; the latest step is used). Text prompts need a ``tokenizer.json`` in the directory and the ``tokenizers``
package; with ``--prompt-ids`` no tokenizer is needed and ids are printed.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def _tokenizer(path: str):
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("this checkpoint has a tokenizer.json: `pip install tokenizers` to use text prompts")
    return Tokenizer.from_file(tok_file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v4jax-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text prompt (needs tokenizer.json in the checkpoint)")
    g.add_argument("--prompt-ids", help="space-separated token ids")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stop", action="store_true", help="do not stop at the eos token")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--weights", default="dequantized", choices=["dequantized", "native"],
                    help="native: keep FP8 / FP4 weights as stored (the checkpoint's bytes in memory), "
                         "dequantized inside the compiled step")
    ap.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                    help="shard the model over a device mesh, e.g. tensor=4,expert=2 (sizes multiply to the device count)")
    ap.add_argument("--speculative", default=None, choices=["mtp"],
                    help="self-speculative decoding with the model's MTP block (same greedy tokens, fewer passes)")
    ap.add_argument("--prefix-cache", default=None, metavar="DIR",
                    help="on-disk prefix cache: reuse the KV cache of a stored prompt prefix (v4jax.PrefixCache)")
    ap.add_argument("--prefix-cache-bytes", type=float, default=16e9, metavar="N",
                    help="evict least-recently-used prefix entries beyond N bytes (default 16e9)")
    a = ap.parse_args(argv)

    import v4jax
    from v4jax.checkpoint import is_workdir, load_workdir

    if not os.path.isdir(a.checkpoint):
        ap.error(f"no checkpoint directory {a.checkpoint!r}")
    if is_workdir(a.checkpoint):
        if a.weights == "native":
            ap.error("--weights native reads a safetensors checkpoint (FP8 / FP4); a training workdir holds fp32 weights")
        model = load_workdir(a.checkpoint, dtype=a.dtype)
    else:
        model = v4jax.load_hf(a.checkpoint, weights=a.weights, dtype=a.dtype)
    if a.mesh is not None:
        from v4jax.config import ConfigError

        try:
            model = model.shard(a.mesh)
        except ConfigError as e:
            ap.error(str(e))
    tok = _tokenizer(a.checkpoint)
    if a.prompt is not None:
        if tok is None:
            ap.error("--prompt needs a tokenizer.json in the checkpoint; use --prompt-ids")
        ids = tok.encode(a.prompt).ids
        print(a.prompt, end="", flush=True)
    else:
        try:
            ids = [int(x) for x in a.prompt_ids.split()]
        except ValueError:
            ap.error(f"--prompt-ids must be integers, got {a.prompt_ids!r}")
        print(" ".join(map(str, ids)), end="", flush=True)

    def stream(step, tokens):
        t = int(tokens[0])
        print(tok.decode([t]) if tok is not None else f" {t}", end="", flush=True)

    from v4jax.inputs import InputError

    cache = None
    if a.prefix_cache is not None:
        cache = v4jax.PrefixCache(a.prefix_cache, max_bytes=int(a.prefix_cache_bytes))
    try:
        model.generate(np.asarray([ids], np.int32), a.max_new_tokens, a.temperature, a.top_p, a.seed,
                       stop_tokens=() if a.no_stop else None, on_token=stream, speculative=a.speculative,
                       prefix_cache=cache)
    except InputError as e:          # a prompt too long for max_seq_len, an id outside the vocabulary, ...
        print()
        ap.error(str(e))
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
