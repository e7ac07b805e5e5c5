"""The public model object: ``V4Model`` (config + variables + jitted pure forward) and ``load_hf``.

``model(ids)`` with an int array ``[B, T]`` returns fp32 logits ``[B, T, vocab]`` as a JAX array;
this call is part of the public API and stays stable. Everything underneath is a pure function of
pytrees: ``Transformer(cfg).apply({"params": ..., "buffers": ...}, ids)``.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from v4jax.attention.context import SeqContext
from v4jax.config import V4Config
from v4jax.inference.generate import generate
from v4jax.inference.sampling import choose_next
from v4jax.inputs import InputError, check_chunk_size, check_token_ids, prompt_lengths
from v4jax.model.layout import layer_tree, stack_variables
from v4jax.model.transformer import Transformer, init_cache
from v4jax.parallel.mesh import make_mesh, under_mesh
from v4jax.parallel.placement import cache_shardings, variables_shardings
from v4jax.params import count_params
from v4jax.runtime import Runtime, split_runtime_kwargs
from v4jax.weights import load_variables, save_official


def _runtime(runtime: Runtime | None, options: dict) -> Runtime:
    rt = runtime or Runtime()
    return Runtime.from_dict({**rt.to_dict(), **options}) if options else rt


def init_variables(cfg: V4Config, seed: int = 0, runtime: Runtime | None = None, shardings=None) -> dict:
    """Freshly initialised ``{"params", "buffers"}`` (spec 4 / techniques 1.5). ``shardings``: a
    matching tree of ``NamedSharding`` (``v4jax.parallel.variables_shardings``): every leaf is
    created on its devices, sharded (the values equal the unsharded ones).

    The init key uses XLA's RngBitGenerator (``impl="rbg"``), which compiles about twice as fast
    as threefry on CPU; results are deterministic for a given seed and backend."""
    module = Transformer(cfg, runtime or Runtime())
    init = lambda key: nn.meta.unbox(module.init(key, jnp.zeros((1, min(4, cfg.max_seq_len)), jnp.int32)))
    fn = jax.jit(init) if shardings is None else jax.jit(init, out_shardings=shardings)
    return fn(jax.random.key(seed, impl="rbg"))


class V4Model:
    """A DeepSeek-V4 model: ``cfg`` (``V4Config``, the architecture), ``variables``
    (``{"params", "buffers"}``, layers stacked as in ``v4jax.model.layout``) and ``runtime``
    (``Runtime``: which attention / MoE implementation, remat policy). Runtime options may also be
    given as keywords: ``V4Model(cfg, variables, attention="reference")``.

    ``mesh``: the device mesh the variables live on (``model.shard(mesh)`` places them); every
    call then runs under it (tensor / expert parallel, the cache split over the batch)."""

    def __init__(self, cfg: V4Config, variables: dict, runtime: Runtime | None = None, mesh=None, **options):
        self.cfg = cfg
        self.runtime = _runtime(runtime, options)
        self.module = Transformer(cfg, self.runtime)
        self.mesh = mesh
        self.variables = stack_variables(cfg, variables)   # accepts the per-layer layout too
        wrap = (lambda f: f) if mesh is None else (lambda f: under_mesh(f, mesh))
        self._forward = wrap(jax.jit(self._pure_forward, static_argnames=("with_mtp",)))
        self._extend = wrap(jax.jit(self._pure_extend))
        # the decode step consumes its cache (donated: the ring and compressor rows update in place)
        self._decode = wrap(jax.jit(self._pure_decode, donate_argnums=(2,), static_argnames=("temperature", "top_p")))

    def with_runtime(self, runtime: Runtime | None = None, **options) -> "V4Model":
        """The same weights under other implementation choices."""
        return V4Model(self.cfg, self.variables, _runtime(runtime or self.runtime, options), mesh=self.mesh)

    def shard(self, mesh) -> "V4Model":
        """The same model with its variables placed on ``mesh`` (a ``jax.sharding.Mesh`` or a spec
        such as ``"tensor=2,expert=4"``) by the rules table; ``None``: back on one device."""
        if mesh is None:
            return V4Model(self.cfg, jax.device_get(self.variables), self.runtime)
        if not isinstance(mesh, jax.sharding.Mesh):
            mesh = make_mesh(mesh)
        variables = jax.device_put(self.variables, variables_shardings(self.cfg, mesh, self.variables))
        return V4Model(self.cfg, variables, self.runtime, mesh=mesh)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def init(cls, cfg: V4Config, seed: int = 0, runtime: Runtime | None = None, **options) -> "V4Model":
        """Freshly initialised weights (training-from-scratch initialisation, spec 4 / techniques 1.5).

        See ``init_variables``."""
        rt = _runtime(runtime, options)
        return cls(cfg, init_variables(cfg, seed, rt), rt)

    # -- forward --------------------------------------------------------------------------------
    def _pure_forward(self, variables, ids, ctx, with_mtp: bool):
        return self.module.apply(variables, ids, ctx, with_mtp=with_mtp)

    def _ids(self, ids) -> jnp.ndarray:
        """Whole sequences ``[B, T]``: ids in the vocabulary, ``T <= cfg.max_seq_len``."""
        return check_token_ids(ids, self.cfg.vocab_size, self.cfg.max_seq_len)

    def __call__(self, ids) -> jax.Array:
        """``ids [B, T]`` int -> fp32 logits ``[B, T, vocab]`` (``T <= cfg.max_seq_len``)."""
        ids = self._ids(ids)
        return self._forward(self.variables, ids, SeqContext(), with_mtp=False)["logits"]

    def forward(self, ids, with_mtp: bool = True, segment_ids=None, dense_attention: bool | None = None) -> dict:
        """Full outputs: ``logits``, ``mtp_logits`` (if the config has MTP), ``moe`` router stats,
        ``indexer`` stats, ``hidden`` final streams ``[B, T, hc_mult, d]``. ``segment_ids [B, T]``:
        packed documents; ``dense_attention=True``: CSA attends to every visible entry (the dense
        training stage) instead of the indexer's top-k."""
        ids = self._ids(ids)
        seg = None
        if segment_ids is not None:
            seg = np.asarray(segment_ids)
            if seg.shape != ids.shape or not np.issubdtype(seg.dtype, np.integer):
                raise InputError(f"segment_ids must be integers of the ids' shape {tuple(ids.shape)}, "
                                 f"got {seg.dtype} {seg.shape}")
            seg = jnp.asarray(seg, jnp.int32)
        ctx = SeqContext(segment_ids=seg, dense_attention=None if dense_attention is None else bool(dense_attention))
        return self._forward(self.variables, ids, ctx, with_mtp=with_mtp)

    # -- cached inference (prefill in chunks of any size, decode = a chunk of one) ---------------
    def _pure_extend(self, variables, ids, cache, n_valid):
        out = self.module.apply(variables, ids, cache, n_valid, method="extend")
        return out["logits"], out["cache"]

    def _pure_decode(self, variables, tokens, cache, key, temperature: float, top_p: float):
        out = self.module.apply(variables, tokens, cache, method="decode")
        return choose_next(out["logits"], key, temperature, top_p), out["logits"], out["cache"]

    def decode_step(self, tokens, cache: dict, temperature: float = 0.0, top_p: float = 1.0, key=None):
        """One decode step for every sequence: ``tokens [B]`` (the last chosen token of each row)
        -> (next tokens ``[B]`` int32, fp32 logits ``[B, vocab]``, new cache). Greedy when
        ``temperature == 0``. The cache passed in is CONSUMED (donated and updated in place): use
        only the returned one. One compile per batch size (and sampling setting). The tokens and
        the cache position are checked on the host first (ids in the vocabulary, room for one more
        token): ``InputError`` otherwise, with the cache left intact."""
        B = cache["pos"].shape[0]
        if getattr(tokens, "shape", np.shape(tokens)) != (B,):
            raise InputError(f"decode_step needs tokens of shape ({B},) for this cache, got {np.shape(tokens)}")
        tokens = check_token_ids(tokens, self.cfg.vocab_size, rank=1)
        self._check_room(cache, np.ones((B,), np.int32))
        key = jax.random.key(0) if key is None else key
        return self._decode(self.variables, tokens, cache, key, temperature=float(temperature), top_p=float(top_p))

    def new_cache(self, batch: int, max_len: int, fmt: str = "native") -> dict:
        """An empty fixed-shape cache for ``batch`` sequences of up to ``max_len`` tokens.
        ``fmt="fp8"`` stores entries as FP8 e4m3 (rope dims bf16) and indexer keys as FP4, see
        ``v4jax.attention.kv_format``. On a mesh the cache is split over the batch axes when
        ``batch`` divides evenly (V4's KV is shared by all heads: there is no head axis to split)."""
        for name, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise InputError(f"new_cache: {name} must be an integer >= 1, got {v!r}")
        if max_len > self.cfg.max_seq_len:
            raise InputError(f"new_cache: max_len {max_len} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        if fmt not in ("native", "fp8"):
            raise InputError(f"cache format must be 'native' or 'fp8', got {fmt!r}")
        cache = init_cache(self.cfg, int(batch), int(max_len), jnp.dtype(self.cfg.dtype), fmt)
        if self.mesh is None:
            return cache

        return jax.device_put(cache, cache_shardings(self.mesh, cache))

    def extend(self, ids, cache: dict, lengths=None):
        """Run the next chunk ``ids [B, T]`` of every sequence against ``cache``; returns
        (fp32 logits ``[B, T, vocab]``, new cache), equal to the full forward's logits at those
        positions. ``lengths [B]``: real tokens per row (right padding; default T); logits at
        padded positions are meaningless. One compile per (B, T) shape."""
        ids = self._ids(ids)
        B, T = ids.shape
        cache_b = cache["pos"].shape[0]
        if B != cache_b:
            raise InputError(f"batch {B} does not match the cache's batch {cache_b}")
        n_valid = np.full((B,), T, np.int32) if lengths is None else np.asarray(lengths)
        if (n_valid.shape != (B,) or not np.issubdtype(n_valid.dtype, np.integer) or (n_valid < 0).any()
                or (n_valid > T).any()):
            raise InputError(f"lengths must be {B} integers in [0, {T}], got {lengths}")
        n_valid = n_valid.astype(np.int32)
        self._check_room(cache, n_valid)
        return self._extend(self.variables, ids, cache, jnp.asarray(n_valid))

    def _check_room(self, cache: dict, n_new: np.ndarray) -> None:
        """Every row's position + its new real tokens must fit the cache (``max_len``, itself at
        most ``cfg.max_seq_len``): past it the compressors' entries have no slot and would be
        dropped silently (wrong logits from then on). Padded tokens (beyond ``lengths``) are never
        stored and do not count."""
        pos, cap = np.asarray(cache["pos"]), int(cache["max_len"])
        if cap > self.cfg.max_seq_len:
            raise InputError(f"the cache holds {cap} tokens, more than the model's max_seq_len {self.cfg.max_seq_len}")
        end = pos.astype(np.int64) + n_new
        if (end > cap).any():
            b = int(np.argmax(end))
            raise InputError(f"cache holds {cap} tokens (max_len): row {b} is at position {int(pos[b])} and "
                             f"cannot add {int(n_new[b])} more ({int(end[b])} > {cap})")

    def prefill(self, ids, max_len: int | None = None, chunk_size: int | None = None, fmt: str = "native",
                lengths=None):
        """Prefill prompts ``ids [B, P]`` (optionally in chunks); right-padded rows of different
        lengths are given by ``lengths [B]``. Returns (logits ``[B, P, vocab]``, cache)."""
        ids = self._ids(ids)
        B, T = ids.shape
        lengths = prompt_lengths(lengths, B, T)
        max_len = T if max_len is None else max_len
        longest = int(lengths.max())
        if isinstance(max_len, (int, np.integer)) and not isinstance(max_len, bool) and max_len < longest:
            raise InputError(f"prefill: max_len {max_len} is shorter than the longest prompt ({longest} tokens)")
        check_chunk_size(chunk_size)
        cache = self.new_cache(B, max_len, fmt)
        chunk_size = chunk_size or T
        outs = []
        for s in range(0, T, chunk_size):
            chunk = ids[:, s:s + chunk_size]
            n = np.clip(lengths - s, 0, chunk.shape[1])
            logits, cache = self.extend(chunk, cache, n)
            outs.append(logits)
        return jnp.concatenate(outs, axis=1), cache

    def generate(self, ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop_tokens=None, chunk_size: int | None = None,
                 on_token=None, lengths=None, cache_format: str = "native", speculative: str | None = None,
                 stats: dict | None = None, prefix_cache=None) -> np.ndarray:
        """Autoregressive generation from prompts ``ids [B, P]`` (right-padded when ``lengths [B]``
        gives different prompt lengths; each row continues after its own last token). Greedy when
        ``temperature == 0``, else temperature + nucleus (``top_p``) sampling. ``stop_tokens``
        (default: the config's eos; ``()`` for none) end a sequence; positions after its stop are
        filled with the stop token and generation ends when every sequence stopped. Returns the
        new token ids ``[B, n <= max_new_tokens]``. ``on_token(step, tokens[B])`` is called as each
        step's tokens are chosen (streaming).

        ``speculative="mtp"``: self-speculative decoding (``v4jax.inference.speculative``): the MTP
        block drafts a token, one main-model pass over two tokens verifies it, so an accepted draft
        gives two tokens per pass. Greedy output is identical to plain greedy decoding; sampled
        output has the model's distribution. ``stats`` (a dict): filled with the acceptance counts.

        ``prefix_cache`` (a ``v4jax.PrefixCache``): each prompt's longest stored block-aligned prefix
        is restored from disk instead of prefilled, and new aligned prefixes are stored after the
        prefill (``v4jax.inference.prefix_cache``); the output is the same as without it."""
        return generate(self, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        stop_tokens=stop_tokens, chunk_size=chunk_size, on_token=on_token, lengths=lengths,
                        cache_format=cache_format, speculative=speculative, stats=stats, prefix_cache=prefix_cache)

    # -- accessors and export -------------------------------------------------------------------
    @property
    def params(self) -> dict:
        return self.variables["params"]

    @property
    def buffers(self) -> dict:
        return self.variables.get("buffers", {})

    def param_count(self):
        return count_params(self.cfg)

    def layer_params(self, i: int) -> dict:
        """Layer ``i``'s parameters (sliced from its stack)."""
        return layer_tree(self.cfg, self.params, i)

    def save(self, path: str | os.PathLike, dtype: str = "float32", shard_bytes: int | None = None,
             quantize: str | None = None) -> None:
        """Write an official-naming checkpoint directory (config.json + safetensors).
        ``quantize="official"``: FP8 / FP4 weights as released (``v4jax.weights.save_official``)."""
        save_official(self.variables, self.cfg, path, dtype=dtype, shard_bytes=shard_bytes, quantize=quantize)

    def __repr__(self) -> str:
        return f"V4Model({self.cfg.name}: {self.cfg.n_layers} layers, d={self.cfg.dim}, vocab={self.cfg.vocab_size})"


def load_hf(path: str | os.PathLike, weights: str = "dequantized", **overrides) -> V4Model:
    """Load a DeepSeek-V4 checkpoint directory (``config.json`` + ``*.safetensors``, single file or
    sharded with an index) in the official or the ``transformers`` naming. FP8/FP4 weights are
    dequantized on load, tensor by tensor; ``weights="native"`` keeps them as stored (FP8 codes
    with their 128x128 block scales, FP4 packed two per byte with 1x32 scales, the rest in its
    stored dtype), dequantized inside the compiled forward, layer by layer: the resident bytes
    are the checkpoint's (``v4jax.weights.load_variables``). ``overrides`` are ``V4Config`` fields (e.g.
    ``dtype="bfloat16"``) or ``Runtime`` options (``attention="xla"|"reference"|"pallas"``,
    ``moe="auto"|"blocked"|"ragged"|"tokamax"|"dense"``, ``remat=...``; the old names ``attention_impl`` / ``moe_impl`` work)."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    cfg_kw, rt_kw = split_runtime_kwargs(overrides)
    cfg = V4Config.from_json(cfg_path, **cfg_kw)
    variables, cfg = load_variables(path, cfg, weights=weights)
    return V4Model(cfg, variables, Runtime.from_dict(rt_kw))


__all__ = ["V4Model", "load_hf", "init_variables", "InputError", "check_token_ids", "prompt_lengths",
           "check_chunk_size"]
