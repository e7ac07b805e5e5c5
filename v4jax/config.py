"""One source of truth for a DeepSeek-V4 model: a frozen, validated dataclass with named presets.

Spec: ``deepseek_v4_architecture.md`` section 1 (values), 1.2 (layer schedule), 11 (tiny config).

Each module receives only the small typed part it needs (``RopeSpec``, ``CompressorSpec``,
``IndexerSpec``, ``AttentionSpec``, ``MoESpec``, ``HCSpec``), built by the methods of ``V4Config``.
Reading and writing both the ``transformers`` ``config.json`` keys and the official
``inference/config.json`` keys is done by ``V4Config.from_dict`` / ``to_hf_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Literal

LayerType = Literal["window", "csa", "hca"]
LAYER_TYPES = ("window", "csa", "hca")
QAT_MODES = ("none", "fp4_experts", "fp4_experts+fp8")   # V4Config.qat; their formats: v4jax.layers.quantized

# transformers' names for the layer types, and back.
_HF_LAYER = {
    "window": "sliding_attention",
    "csa": "compressed_sparse_attention",
    "hca": "heavily_compressed_attention",
}
_FROM_HF_LAYER = {v: k for k, v in _HF_LAYER.items()}


class ConfigError(ValueError):
    """Raised when a configuration breaks a rule; the message names the field and the rule."""


_RUNTIME_KEYS = ("attention_impl", "moe_impl", "dense_compressed_attention", "attention", "moe", "remat")


def _refuse_runtime_keys(keys) -> None:
    bad = sorted(k for k in keys if k in _RUNTIME_KEYS)
    if bad:
        raise ConfigError(f"{bad} are not architecture: pass them as runtime options (v4jax.Runtime, or "
                          f"load_hf(..., attention='xla'|'reference'|'pallas', moe='auto'|'blocked'|'ragged'|'tokamax'|'dense'); the dense "
                          f"curriculum stage is SeqContext(dense_attention=True))")


# ---------------------------------------------------------------------------------------------
# Small typed views handed to modules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeSpec:
    """Partial interleaved RoPE on the trailing ``rope_dim`` dims (spec 2)."""

    rope_dim: int
    theta: float
    yarn_factor: float = 1.0  # 1.0 or original_seq_len == 0 means no YaRN
    original_seq_len: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    @property
    def uses_yarn(self) -> bool:
        return self.original_seq_len > 0 and self.yarn_factor != 1.0


@dataclass(frozen=True)
class CompressorSpec:
    """A KV compressor (spec 3.3): ``ratio`` tokens -> one entry of width ``out_dim``."""

    dim: int
    out_dim: int
    ratio: int
    overlap: bool  # CSA-style two-half overlapping blocks
    norm_eps: float


@dataclass(frozen=True)
class IndexerSpec:
    """The lightning indexer of a CSA layer (spec 3.4)."""

    dim: int
    q_lora_rank: int
    n_heads: int
    head_dim: int
    topk: int
    compressor: CompressorSpec
    qat: str = "none"   # V4Config.qat: its wq_b is an FP8 weight


@dataclass(frozen=True)
class AttentionSpec:
    """One hybrid attention layer (spec 3)."""

    layer_type: LayerType
    dim: int
    n_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    norm_eps: float
    rope: RopeSpec
    compressor: CompressorSpec | None
    indexer: IndexerSpec | None
    qat: str = "none"   # V4Config.qat (v4jax.layers.quantized.QAT_MODES)


@dataclass(frozen=True)
class MoESpec:
    """DeepSeekMoE layer (spec 5)."""

    dim: int
    n_experts: int
    n_shared: int
    topk: int
    inter_dim: int
    route_scale: float
    swiglu_limit: float
    score_func: str
    hash_routed: bool
    vocab_size: int
    qat: str = "none"   # V4Config.qat (v4jax.layers.quantized.QAT_MODES)


@dataclass(frozen=True)
class HCSpec:
    """mHC (spec 4)."""

    dim: int
    n_streams: int
    sinkhorn_iters: int
    eps: float
    norm_eps: float


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class V4Config:
    """Every field of spec section 1. Field names follow the official ``inference/config.json``."""

    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    # Per layer: "window" (pure sliding window), "csa" (overlapping ratio-`csa_ratio` compressor +
    # lightning indexer) or "hca" (non-overlapping ratio-`hca_ratio` compressor, dense).
    layer_types: tuple[str, ...] = ()
    csa_ratio: int = 4
    hca_ratio: int = 128
    n_hash_layers: int = 3
    # attention
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    # indexer
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    # rope
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 1048576
    # MTP
    n_mtp_layers: int = 1
    # tokens
    bos_token_id: int = 0
    eos_token_id: int = 1
    # numerics (which kernels compute the model is a runtime option: ``v4jax.runtime.Runtime``)
    dtype: str = "float32"  # activation / compute dtype: float32 or bfloat16
    param_dtype: str = "float32"
    # quantisation-aware training (spec 8, report 3.4): "none", "fp4_experts" (routed experts
    # rounded to FP4 e2m1 with 1x32 e8m0 scales in the forward, straight-through gradient) or
    # "fp4_experts+fp8" (also the FP8 128x128-block linears); v4jax.layers.quantized.QAT_MODES
    qat: str = "none"
    name: str = "custom"

    # -- validation ---------------------------------------------------------------------------
    def __post_init__(self):
        def need(cond: bool, fld: str, rule: str):
            if not cond:
                raise ConfigError(f"V4Config.{fld}: {rule} (got {getattr(self, fld)!r})")

        # types first (so the rules below never compare a string with a number): int fields take
        # integers only (not bools, not 64.0), float fields any finite real (not bools; stored as
        # float), str fields strings; numpy scalars are turned into Python ones
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), _FIELD_KINDS.get(f.name)
            if kind == "int":
                need(isinstance(v, numbers.Integral) and not isinstance(v, bool), f.name, "must be an integer")
                object.__setattr__(self, f.name, int(v))
            elif kind == "float":
                need(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v), f.name,
                     "must be a finite number")
                object.__setattr__(self, f.name, float(v))
            elif kind == "str":
                need(isinstance(v, str), f.name, "must be a string")
        need(isinstance(self.layer_types, (tuple, list)) and all(isinstance(t, str) for t in self.layer_types),
             "layer_types", f"must be a sequence of layer type names {LAYER_TYPES}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("window",) * self.n_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))

        for f in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
                  "o_lora_rank", "window_size", "index_n_heads", "index_head_dim", "n_routed_experts",
                  "n_activated_experts", "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters", "csa_ratio",
                  "hca_ratio", "max_seq_len"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, "must be an integer >= 1")
        need(len(self.layer_types) == self.n_layers, "layer_types",
             f"must have one entry per layer (n_layers={self.n_layers})")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        need(not bad, "layer_types", f"unknown layer type(s) {bad}; allowed {LAYER_TYPES}")
        need(0 <= self.n_hash_layers <= self.n_layers, "n_hash_layers", "must be in [0, n_layers]")
        need(0 < self.rope_head_dim <= self.head_dim and self.rope_head_dim % 2 == 0, "rope_head_dim",
             "must be even and in (0, head_dim]")
        need(self.rope_head_dim <= self.index_head_dim, "rope_head_dim",
             f"must be <= index_head_dim ({self.index_head_dim}): the indexer ropes its trailing dims")
        need(self.n_heads % self.o_groups == 0, "o_groups",
             f"n_heads ({self.n_heads}) must be divisible by o_groups")
        need(self.index_topk >= 1, "index_topk", "must be >= 1")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"must be <= n_routed_experts ({self.n_routed_experts})")
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(self.score_func in ("sqrtsoftplus", "sigmoid", "softmax"), "score_func",
             "must be one of sqrtsoftplus, sigmoid, softmax")
        need(self.csa_ratio == 4, "csa_ratio", "CSA uses the overlapping 4:1 compressor (official code: overlap iff ratio == 4)")
        need(self.hca_ratio != 4, "hca_ratio", "HCA ratio 4 would be read back as CSA by the official code")
        need(self.n_mtp_layers in (0, 1), "n_mtp_layers", "only depth 0 or 1 is supported (V4 uses 1)")
        need(self.hc_mult >= 1, "hc_mult", "must be >= 1")
        need(self.dtype in ("float32", "bfloat16"), "dtype", "must be float32 or bfloat16")
        need(self.param_dtype in ("float32", "bfloat16"), "param_dtype", "must be float32 or bfloat16")
        need(self.qat in QAT_MODES, "qat", f"must be one of {QAT_MODES}")
        need(self.rope_factor >= 1.0, "rope_factor", "must be >= 1")
        for f in ("rope_theta", "compress_rope_theta"):
            need(getattr(self, f) > 1.0, f, "must be > 1")
        for f in ("beta_fast", "beta_slow", "route_scale", "swiglu_limit"):
            need(getattr(self, f) > 0, f, "must be > 0")
        need(self.original_seq_len >= 0, "original_seq_len", "must be >= 0 (0 disables YaRN)")
        need(self.norm_eps > 0 and self.hc_eps >= 0, "norm_eps", "eps values must be positive")
        need(0 <= self.bos_token_id < self.vocab_size, "bos_token_id", "must be a token id < vocab_size")
        need(0 <= self.eos_token_id < self.vocab_size, "eos_token_id", "must be a token id < vocab_size")

    # -- derived views --------------------------------------------------------------------------
    def replace(self, **kw) -> "V4Config":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        _refuse_runtime_keys(unknown)
        if unknown:
            raise ConfigError(f"V4Config has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **kw)

    @property
    def compress_ratios(self) -> tuple[int, ...]:
        """Official per-layer list (n_layers entries, plus one 0 for the MTP block if present)."""
        r = {"window": 0, "csa": self.csa_ratio, "hca": self.hca_ratio}
        return tuple(r[t] for t in self.layer_types) + ((0,) * self.n_mtp_layers)

    def ratio(self, layer_type: str) -> int:
        return {"window": 0, "csa": self.csa_ratio, "hca": self.hca_ratio}[layer_type]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def rope(self, layer_type: str) -> RopeSpec:
        """Pure-window layers (and MTP): theta=rope_theta, no YaRN. CSA/HCA: compress theta + YaRN."""
        if layer_type == "window":
            return RopeSpec(self.rope_head_dim, float(self.rope_theta))
        return RopeSpec(self.rope_head_dim, float(self.compress_rope_theta), float(self.rope_factor),
                        int(self.original_seq_len), float(self.beta_fast), float(self.beta_slow))

    def compressor(self, layer_type: str, out_dim: int | None = None) -> CompressorSpec | None:
        if layer_type == "window":
            return None
        return CompressorSpec(dim=self.dim, out_dim=out_dim or self.head_dim, ratio=self.ratio(layer_type),
                              overlap=layer_type == "csa", norm_eps=self.norm_eps)

    def indexer(self, layer_type: str) -> IndexerSpec | None:
        if layer_type != "csa":
            return None
        return IndexerSpec(dim=self.dim, q_lora_rank=self.q_lora_rank, n_heads=self.index_n_heads,
                           head_dim=self.index_head_dim, topk=self.index_topk,
                           compressor=self.compressor("csa", self.index_head_dim), qat=self.qat)

    def attention(self, layer_type: str) -> AttentionSpec:
        return AttentionSpec(
            layer_type=layer_type, dim=self.dim, n_heads=self.n_heads, head_dim=self.head_dim,
            q_lora_rank=self.q_lora_rank, o_groups=self.o_groups, o_lora_rank=self.o_lora_rank,
            window=self.window_size, norm_eps=self.norm_eps, rope=self.rope(layer_type),
            compressor=self.compressor(layer_type), indexer=self.indexer(layer_type), qat=self.qat)

    def moe(self, hash_routed: bool) -> MoESpec:
        return MoESpec(dim=self.dim, n_experts=self.n_routed_experts, n_shared=self.n_shared_experts,
                       topk=self.n_activated_experts, inter_dim=self.moe_inter_dim,
                       route_scale=float(self.route_scale), swiglu_limit=float(self.swiglu_limit),
                       score_func=self.score_func, hash_routed=hash_routed, vocab_size=self.vocab_size,
                       qat=self.qat)

    def hc(self) -> HCSpec:
        return HCSpec(dim=self.dim, n_streams=self.hc_mult, sinkhorn_iters=self.hc_sinkhorn_iters,
                      eps=float(self.hc_eps), norm_eps=float(self.norm_eps))

    # -- (de)serialisation ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "V4Config":
        """Build from a ``transformers`` config.json dict or an official ``inference/config.json`` dict.

        Both key styles are accepted (HF keys win when both are present). ``overrides`` are
        ``V4Config`` field names (e.g. ``dtype="bfloat16"``); kernel choices are ``Runtime`` options.
        """
        _refuse_runtime_keys(set(overrides))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"V4Config has no field(s) {sorted(unknown)}")
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a dict (a JSON object), got {type(d).__name__}")
        try:
            kw = V4Config._kwargs_from_dict(d)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            # a value of the wrong type (a string where a number goes, a list for a dict, ...)
            raise ConfigError(f"config has a malformed value: {type(e).__name__}: {e}") from None
        kw.update(overrides)
        return cls(**kw)

    @staticmethod
    def _kwargs_from_dict(d: dict[str, Any]) -> dict[str, Any]:
        """``V4Config`` keyword arguments from a ``transformers`` or official config dict."""
        g = lambda *keys, default=None: next((d[k] for k in keys if k in d and d[k] is not None), default)
        n_layers = g("num_hidden_layers", "n_layers")
        if n_layers is None:
            raise ConfigError("config has neither 'num_hidden_layers' nor 'n_layers'")
        csa_ratio, hca_ratio = 4, 128
        rates = g("compress_rates")
        if rates is not None and not isinstance(rates, dict):
            raise ConfigError(f"config compress_rates: must be an object of ratios per layer type, got {rates!r}")
        if rates is not None:   # the values are checked by V4Config (integers)
            csa_ratio = rates.get("compressed_sparse_attention", 4)
            hca_ratio = rates.get("heavily_compressed_attention", 128)
        if "layer_types" in d and d["layer_types"]:
            try:
                layer_types = tuple(_FROM_HF_LAYER[t] for t in d["layer_types"][:n_layers])
            except KeyError as e:
                raise ConfigError(f"config layer_types: unknown layer type {e.args[0]!r}") from None
        elif "compress_ratios" in d:
            ratios = list(d["compress_ratios"])[:n_layers]
            hca = {r for r in ratios if r not in (0, 4)}
            if len(hca) > 1:
                raise ConfigError(f"compress_ratios: more than one HCA ratio {sorted(hca)}")
            if hca:
                hca_ratio = hca.pop()
            layer_types = tuple("window" if r == 0 else "csa" if r == 4 else "hca" for r in ratios)
        else:  # transformers' default schedule (Pro pattern)
            layer_types = tuple(("hca",) * min(n_layers, 2) +
                                tuple("csa" if i % 2 else "hca" for i in range(max(n_layers - 2, 0))))
        if "mlp_layer_types" in d and d["mlp_layer_types"]:
            mlt = list(d["mlp_layer_types"])[:n_layers]
            n_hash = sum(1 for t in mlt if t == "hash_moe")
            if mlt != ["hash_moe"] * n_hash + ["moe"] * (n_layers - n_hash):
                raise ConfigError("mlp_layer_types: hash_moe layers must come first")
        else:
            n_hash = g("num_hash_layers", "n_hash_layers", default=3)
        head_dim = g("head_dim", default=512)
        rope_dim = g("qk_rope_head_dim", "rope_head_dim")
        if rope_dim is None and g("partial_rotary_factor") is not None:
            rope_dim = int(head_dim * g("partial_rotary_factor"))
        rope_dim = rope_dim or 64
        # YaRN: official keys, or HF rope_scaling / rope_parameters["compress"]
        factor, orig, bfast, bslow = g("rope_factor"), g("original_seq_len"), g("beta_fast"), g("beta_slow")
        rp = d.get("rope_parameters") or {}
        if not isinstance(rp, dict):
            raise ConfigError(f"config rope_parameters: must be an object, got {rp!r}")
        compress_theta = g("compress_rope_theta", default=160000.0)
        if isinstance(rp.get("compress"), dict):  # transformers' per-rope-type parameters
            rs = rp["compress"]
            compress_theta = rs.get("rope_theta", compress_theta)
        else:  # legacy top-level rope_scaling (its rope_theta, if any, is the MAIN theta)
            rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, dict):
            raise ConfigError(f"config rope_scaling: must be an object (or null), got {rs!r}")
        if isinstance(rs, dict):
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("yarn", "default"):
                raise ConfigError(f"config rope scaling type {kind!r} is not supported "
                                  "(V4 uses 'yarn', or 'default' for none)")
            if kind == "yarn":
                factor = rs.get("factor", factor)
                orig = rs.get("original_max_position_embeddings", orig)
                bfast = rs.get("beta_fast", bfast)
                bslow = rs.get("beta_slow", bslow)
            else:
                factor, orig = 1.0, 0
        elif "rope_factor" not in d and "original_seq_len" not in d:
            factor, orig = 1.0, 0
        main_theta = g("rope_theta", default=10000.0)
        if isinstance(rp.get("main"), dict):
            main_theta = rp["main"].get("rope_theta", main_theta)
        eos = g("eos_token_id", default=1)
        if isinstance(eos, list):
            eos = eos[0]
        kw = dict(
            vocab_size=g("vocab_size"), dim=g("hidden_size", "dim"), n_layers=n_layers,
            layer_types=layer_types, csa_ratio=csa_ratio, hca_ratio=hca_ratio, n_hash_layers=n_hash,
            n_heads=g("num_attention_heads", "n_heads"), head_dim=head_dim, rope_head_dim=rope_dim,
            q_lora_rank=g("q_lora_rank"), o_groups=g("o_groups"), o_lora_rank=g("o_lora_rank"),
            window_size=g("sliding_window", "window_size"), index_n_heads=g("index_n_heads"),
            index_head_dim=g("index_head_dim"), index_topk=g("index_topk"),
            n_routed_experts=g("n_routed_experts"), n_shared_experts=g("n_shared_experts", default=1),
            n_activated_experts=g("num_experts_per_tok", "n_activated_experts"),
            moe_inter_dim=g("moe_intermediate_size", "moe_inter_dim"),
            score_func=g("scoring_func", "score_func", default="sqrtsoftplus"),
            route_scale=g("routed_scaling_factor", "route_scale", default=1.0),
            swiglu_limit=g("swiglu_limit", default=10.0), hc_mult=g("hc_mult", default=4),
            hc_sinkhorn_iters=g("hc_sinkhorn_iters", default=20), hc_eps=g("hc_eps", default=1e-6),
            norm_eps=g("rms_norm_eps", "norm_eps", default=1e-6), rope_theta=main_theta,
            compress_rope_theta=compress_theta, rope_factor=factor if factor is not None else 1.0,
            original_seq_len=orig if orig is not None else 0,
            beta_fast=bfast if bfast is not None else 32, beta_slow=bslow if bslow is not None else 1,
            max_seq_len=g("max_position_embeddings", "max_seq_len", default=1048576),
            n_mtp_layers=g("num_nextn_predict_layers", "n_mtp_layers", default=1),
            bos_token_id=g("bos_token_id", default=0), eos_token_id=eos,
        )
        missing = [k for k, v in kw.items() if v is None]
        if missing:
            raise ConfigError(f"config is missing required key(s) for {missing}")
        return kw   # float fields given as JSON integers become floats in V4Config.__post_init__

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> "V4Config":
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``transformers``-style config.json (which ``DeepseekV4Config`` reads) with the official keys too."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": 1, "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim, "partial_rotary_factor": self.rope_head_dim / self.head_dim,
            "q_lora_rank": self.q_lora_rank, "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.window_size, "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim, "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts, "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts, "moe_intermediate_size": self.moe_inter_dim,
            "scoring_func": self.score_func, "norm_topk_prob": True, "routed_scaling_factor": self.route_scale,
            "swiglu_limit": self.swiglu_limit, "hc_mult": self.hc_mult, "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta, "max_position_embeddings": self.max_seq_len,
            "num_nextn_predict_layers": self.n_mtp_layers, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "tie_word_embeddings": False, "hidden_act": "silu",
            "layer_types": [_HF_LAYER[t] for t in self.layer_types],
            "compress_rates": {"compressed_sparse_attention": self.csa_ratio,
                               "heavily_compressed_attention": self.hca_ratio},
            "mlp_layer_types": ["hash_moe"] * self.n_hash_layers + ["moe"] * (self.n_layers - self.n_hash_layers),
            # official inference keys (transformers ignores them when layer_types / mlp_layer_types are set)
            "compress_ratios": list(self.compress_ratios), "num_hash_layers": self.n_hash_layers,
            "torch_dtype": "bfloat16" if self.param_dtype == "bfloat16" else "float32",
        }
        if self.rope("hca").uses_yarn:
            d["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor,
                                 "original_max_position_embeddings": self.original_seq_len,
                                 "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)


# The type of every scalar field, from the annotations ("int", "float" or "str"; layer_types apart).
_FIELD_KINDS = {f.name: {"int": "int", "float": "float", "str": "str"}.get(str(f.type))
                for f in dataclasses.fields(V4Config)}


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

def _flash() -> V4Config:
    lt = ("window", "window") + tuple("csa" if i % 2 == 0 else "hca" for i in range(2, 43))
    return V4Config(name="flash", layer_types=lt)


def _pro() -> V4Config:
    lt = ("hca", "hca") + tuple("csa" if i % 2 == 0 else "hca" for i in range(2, 61))
    return V4Config(name="pro", vocab_size=129280, dim=7168, n_layers=61, layer_types=lt, n_heads=128,
                    q_lora_rank=1536, o_groups=16, n_routed_experts=384, moe_inter_dim=3072,
                    route_scale=2.5, index_topk=1024)


def _tiny() -> V4Config:
    """Spec section 11: ~27M parameters, every feature on; HCA ratio scaled to 32; YaRN exercised."""
    return V4Config(
        name="tiny", vocab_size=4096, dim=256, n_layers=6,
        layer_types=("window", "csa", "hca", "csa", "hca", "csa"), csa_ratio=4, hca_ratio=32,
        n_hash_layers=2, n_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=128, o_groups=2,
        o_lora_rank=64, window_size=32, index_n_heads=4, index_head_dim=32, index_topk=16,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=256,
        route_scale=1.5, swiglu_limit=10.0, rope_factor=4.0, original_seq_len=128, max_seq_len=4096,
        n_mtp_layers=1)


def _small() -> V4Config:
    """~100M total parameters (~30M active per token), trainable on a CPU in about an hour at T=512."""
    return V4Config(
        name="small", vocab_size=8192, dim=512, n_layers=8,
        layer_types=("window", "csa", "hca", "csa", "hca", "csa", "hca", "csa"), csa_ratio=4, hca_ratio=64,
        n_hash_layers=2, n_heads=8, head_dim=64, rope_head_dim=16, q_lora_rank=256, o_groups=4,
        o_lora_rank=128, window_size=64, index_n_heads=8, index_head_dim=32, index_topk=32,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=384,
        route_scale=1.5, rope_factor=4.0, original_seq_len=512, max_seq_len=16384, n_mtp_layers=1)


PRESETS = {"tiny": _tiny, "small": _small, "flash": _flash, "pro": _pro}


def preset(name: str, /, **overrides) -> V4Config:
    """A named preset (``tiny``, ``small``, ``flash``, ``pro``) with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
