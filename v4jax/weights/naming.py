"""One declarative table between checkpoint tensor names and the v4jax variable tree.

Spec: 3.6 (``wo_a`` layout), 3.7 (official / HF names), 5 (router, experts), 6 (MTP block),
10.8 (naming). Three namings are accepted on load, all normalised through ``RULES``:

* **official** (released weights): ``embed.weight``, ``layers.{i}.attn.wq_a.weight``,
  ``layers.{i}.ffn.experts.{e}.w1.weight``, ``mtp.0.e_proj.weight``, ... (the ``official`` column);
* **transformers in memory** (``DeepseekV4ForCausalLM.state_dict()``): ``model.layers.{i}.self_attn
  .q_a_proj.weight``, packed experts ``mlp.experts.gate_up_proj [E, 2I, d]`` (gate first) and
  ``mlp.experts.down_proj [E, d, I]`` (the ``hf`` column and ``PACKED``);
* **transformers on disk** (``save_pretrained`` reverses its renames, imperfectly): official leaf
  names under ``model.`` plus ``model.embed_tokens.weight``, ``model.hc_head.hc_fn``,
  ``head.weight`` and ``attn.norm.weight`` for the attention ``kv_norm`` (the ``aliases`` column).

A leading ``model.`` is stripped before lookup. Torch ``Linear`` weights are ``[out, in]``; our
kernels are ``[in, out]``: each rule names the ``layout`` that converts one into the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rule:
    """``official`` name (relative to its scope; ``{e}`` = expert index) -> our leaf ``path``
    (relative to the scope, inside ``collection``), converted by ``layout`` (see ``to_ours``)."""

    official: str
    path: str
    layout: str = "copy"
    collection: str = "params"
    hf: str | None = None          # transformers in-memory name (relative to the HF scope)
    aliases: tuple[str, ...] = ()  # other accepted spellings (save_pretrained quirks, ...)


def _r(official, path, layout="copy", hf=None, *aliases, collection="params"):
    return Rule(official, path, layout, collection, hf, tuple(aliases))


# Top level (official scope "", ours "").
TOP_RULES = (
    _r("embed.weight", "embed/embedding", "copy", "embed_tokens.weight"),
    _r("head.weight", "head/kernel", "linear", "lm_head.weight"),
    _r("norm.weight", "norm/scale", "copy", "norm.weight"),
    _r("hc_head_fn", "hc_head/fn", "copy", "hc_head.hc_fn"),
    _r("hc_head_base", "hc_head/base", "copy", "hc_head.hc_base"),
    _r("hc_head_scale", "hc_head/scale", "copy", "hc_head.hc_scale"),
)

# One decoder block (official scope "layers.{i}." / "mtp.{j}.", ours "layers_{i}/" / "mtp_{j}/").
# Rules whose target the config does not have (e.g. an indexer in an HCA layer) are simply absent
# from the expected tree; a checkpoint tensor aimed at one is reported as unexpected.
BLOCK_RULES = (
    _r("hc_attn_fn", "hc_attn/fn", "copy", "attn_hc.fn"),
    _r("hc_attn_base", "hc_attn/base", "copy", "attn_hc.base"),
    _r("hc_attn_scale", "hc_attn/scale", "copy", "attn_hc.scale"),
    _r("hc_ffn_fn", "hc_ffn/fn", "copy", "ffn_hc.fn"),
    _r("hc_ffn_base", "hc_ffn/base", "copy", "ffn_hc.base"),
    _r("hc_ffn_scale", "hc_ffn/scale", "copy", "ffn_hc.scale"),
    _r("attn_norm.weight", "attn_norm/scale", "copy", "input_layernorm.weight"),
    _r("ffn_norm.weight", "ffn_norm/scale", "copy", "post_attention_layernorm.weight"),
    # attention (3.1, 3.2, 3.5, 3.6)
    _r("attn.wq_a.weight", "attn/wq_a/kernel", "linear", "self_attn.q_a_proj.weight"),
    _r("attn.q_norm.weight", "attn/q_norm/scale", "copy", "self_attn.q_a_norm.weight"),
    _r("attn.wq_b.weight", "attn/wq_b/kernel", "linear", "self_attn.q_b_proj.weight"),
    _r("attn.wkv.weight", "attn/wkv/kernel", "linear", "self_attn.kv_proj.weight"),
    _r("attn.kv_norm.weight", "attn/kv_norm/scale", "copy", "self_attn.kv_norm.weight",
       "attn.norm.weight"),  # transformers' save_pretrained writes kv_norm back as "norm"
    _r("attn.wo_a.weight", "attn/wo_a", "wo_a", "self_attn.o_a_proj.weight"),
    _r("attn.wo_b.weight", "attn/wo_b/kernel", "linear", "self_attn.o_b_proj.weight"),
    _r("attn.attn_sink", "attn/attn_sink", "copy", "self_attn.sinks"),
    # compressor (3.3)
    _r("attn.compressor.wkv.weight", "attn/compressor/wkv/kernel", "linear", "self_attn.compressor.kv_proj.weight"),
    _r("attn.compressor.wgate.weight", "attn/compressor/wgate/kernel", "linear",
       "self_attn.compressor.gate_proj.weight"),
    _r("attn.compressor.ape", "attn/compressor/ape", "copy", "self_attn.compressor.position_bias"),
    _r("attn.compressor.norm.weight", "attn/compressor/norm/scale", "copy", "self_attn.compressor.kv_norm.weight"),
    # lightning indexer (3.4)
    _r("attn.indexer.wq_b.weight", "attn/indexer/wq_b/kernel", "linear", "self_attn.compressor.indexer.q_b_proj.weight"),
    _r("attn.indexer.weights_proj.weight", "attn/indexer/weights_proj/kernel", "linear",
       "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    _r("attn.indexer.compressor.wkv.weight", "attn/indexer/compressor/wkv/kernel", "linear",
       "self_attn.compressor.indexer.kv_proj.weight"),
    _r("attn.indexer.compressor.wgate.weight", "attn/indexer/compressor/wgate/kernel", "linear",
       "self_attn.compressor.indexer.gate_proj.weight"),
    _r("attn.indexer.compressor.ape", "attn/indexer/compressor/ape", "copy",
       "self_attn.compressor.indexer.position_bias"),
    _r("attn.indexer.compressor.norm.weight", "attn/indexer/compressor/norm/scale", "copy",
       "self_attn.compressor.indexer.kv_norm.weight"),
    # MoE (5)
    _r("ffn.gate.weight", "ffn/gate/kernel", "linear", "mlp.gate.weight"),
    _r("ffn.gate.bias", "ffn/gate/bias", "copy", "mlp.gate.e_score_correction_bias", collection="buffers"),
    _r("ffn.gate.tid2eid", "ffn/gate/tid2eid", "int", "mlp.gate.tid2eid", collection="buffers"),
    _r("ffn.shared_experts.w1.weight", "ffn/shared_experts/w1/kernel", "linear", "mlp.shared_experts.gate_proj.weight"),
    _r("ffn.shared_experts.w2.weight", "ffn/shared_experts/w2/kernel", "linear", "mlp.shared_experts.down_proj.weight"),
    _r("ffn.shared_experts.w3.weight", "ffn/shared_experts/w3/kernel", "linear", "mlp.shared_experts.up_proj.weight"),
    _r("ffn.experts.{e}.w1.weight", "ffn/experts/w1", "expert", None, "mlp.experts.{e}.gate_proj.weight"),
    _r("ffn.experts.{e}.w2.weight", "ffn/experts/w2", "expert", None, "mlp.experts.{e}.down_proj.weight"),
    _r("ffn.experts.{e}.w3.weight", "ffn/experts/w3", "expert", None, "mlp.experts.{e}.up_proj.weight"),
)

# MTP extras (spec 6), on top of BLOCK_RULES, only in the "mtp.{j}." scope.
MTP_RULES = (
    _r("e_proj.weight", "e_proj/kernel", "linear", "e_proj.weight"),
    _r("h_proj.weight", "h_proj/kernel", "linear", "h_proj.weight"),
    _r("enorm.weight", "enorm/scale", "copy", "enorm.weight"),
    _r("hnorm.weight", "hnorm/scale", "copy", "hnorm.weight"),
    _r("norm.weight", "norm/scale", "copy", "norm.weight"),
    _r("hc_head_fn", "hc_head/fn", "copy", "hc_head.hc_fn"),
    _r("hc_head_base", "hc_head/base", "copy", "hc_head.hc_base"),
    _r("hc_head_scale", "hc_head/scale", "copy", "hc_head.hc_scale"),
)

# transformers' packed experts: one source tensor fills several stacked leaves (all experts).
PACKED = {
    "mlp.experts.gate_up_proj": (("ffn/experts/w1", "gate_half"), ("ffn/experts/w3", "up_half")),
    "mlp.experts.down_proj": (("ffn/experts/w2", "stacked_t"),),
}

# Names that are neither weights nor errors: the MTP block's copies of the shared embedding and
# head (spec 6: the converter drops them), rotary tables and runtime caches.
IGNORED = re.compile(
    r"^(model\.)?mtp\.\d+\.(emb|embed|embed_tokens|head|lm_head|shared_head)(\.|$)"
    r"|(^|\.)rotary_emb\.|(^|\.)(inv_freq|freqs_cis|kv_cache|kv_state|score_state)$")

# Companion scale of a quantized "X.weight" (spec 8): official "X.scale"; HF-style FP8 names too.
SCALE_SUFFIXES = (".scale", ".weight_scale_inv", ".weight_scale")

_SCOPE = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"(experts)\.(\d+)\.")


@dataclass(frozen=True)
class Placement:
    """Where (part of) one source tensor goes: full leaf ``path`` (``params/...``), ``layout``,
    and the expert slot for per-expert tensors (None otherwise)."""

    path: str
    layout: str
    expert: int | None = None


def _lookup_table(rules) -> dict[str, Rule]:
    table: dict[str, Rule] = {}
    for rule in rules:
        for name in (rule.official, rule.hf, *rule.aliases):
            if name is not None:
                assert name not in table or table[name] is rule, f"ambiguous alias {name}"
                table[name] = rule
    return table


_TOP = _lookup_table(TOP_RULES)
_BLOCK = _lookup_table(BLOCK_RULES)
_MTP = {**_BLOCK, **_lookup_table(MTP_RULES)}


def scope_of(name: str) -> tuple[str, int | None, str]:
    """``(kind, index, rest)`` with kind ``"top"``, ``"layers"`` or ``"mtp"``; ``model.`` stripped."""
    if name.startswith("model."):
        name = name[len("model."):]
    m = _SCOPE.match(name)
    if m is None:
        return "top", None, name
    return m.group(1), int(m.group(2)), m.group(3)


def parse(name: str) -> tuple[Placement, ...] | None:
    """Placements of checkpoint tensor ``name`` in our tree, or None if the name is unknown.
    Layer/MTP indices are not range-checked here (the expected tree does that)."""
    kind, idx, rest = scope_of(name)
    if kind == "top":
        rule = _TOP.get(rest)
        return None if rule is None else (Placement(f"{rule.collection}/{rule.path}", rule.layout),)
    prefix = f"layers_{idx}/" if kind == "layers" else f"mtp_{idx}/"
    if rest in PACKED:
        return tuple(Placement(f"params/{prefix}{p}", lay) for p, lay in PACKED[rest])
    expert = None
    m = _EXPERT.search(rest)
    if m is not None:
        expert = int(m.group(2))
        rest = rest[:m.start()] + "experts.{e}." + rest[m.end():]
    rule = (_MTP if kind == "mtp" else _BLOCK).get(rest)
    if rule is None or (expert is None) != ("{e}" not in rule.official):
        return None
    return (Placement(f"{rule.collection}/{prefix}{rule.path}", rule.layout, expert),)


def scale_base(name: str) -> str | None:
    """``X.weight`` for a quantization scale name ``X.scale`` / ``X.weight_scale_inv``, else None."""
    for suf in SCALE_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)] + ".weight"
    return None


def is_ignored(name: str) -> bool:
    return IGNORED.search(name) is not None


def is_mtp(name: str) -> bool:
    return scope_of(name)[0] == "mtp"


# ---------------------------------------------------------------------------------------------
# Layouts: checkpoint (torch) layout <-> ours
# ---------------------------------------------------------------------------------------------

def to_ours(layout: str, x: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Convert source tensor ``x`` (checkpoint layout) to our layout (one expert slice for
    ``expert``). ``target_shape`` is the full leaf shape (needed by ``wo_a`` and packed halves)."""
    if layout in ("copy", "int"):
        return x
    if layout in ("linear", "expert"):
        return x.T
    if layout == "wo_a":  # [g*d_g, in] -> [g, d_g, in] -> [g, in, d_g]   (spec 3.6)
        g, _, dg = target_shape
        return x.reshape(g, dg, x.shape[-1]).transpose(0, 2, 1)
    if layout == "gate_half":  # [E, 2I, d] -> first half -> [E, d, I]
        return x[:, : x.shape[1] // 2].transpose(0, 2, 1)
    if layout == "up_half":
        return x[:, x.shape[1] // 2:].transpose(0, 2, 1)
    if layout == "stacked_t":  # [E, d, I] -> [E, I, d]
        return x.transpose(0, 2, 1)
    raise ValueError(f"unknown layout {layout!r}")


def to_checkpoint(layout: str, x: np.ndarray) -> np.ndarray:
    """Inverse of ``to_ours`` for the official layouts (``copy``, ``int``, ``linear``, ``expert``
    (one expert slice), ``wo_a``)."""
    if layout in ("copy", "int"):
        return x
    if layout in ("linear", "expert"):
        return x.T
    if layout == "wo_a":  # [g, in, d_g] -> [g, d_g, in] -> [g*d_g, in]
        g, i, dg = x.shape
        return x.transpose(0, 2, 1).reshape(g * dg, i)
    raise ValueError(f"layout {layout!r} has no official inverse")


def source_shape(layout: str, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape the checkpoint tensor must have (logical, i.e. before FP4 packing)."""
    t = tuple(target_shape)
    if layout in ("copy", "int"):
        return t
    if layout == "linear":
        return t[::-1]
    if layout == "expert":  # leaf [E, a, b] -> one expert [b, a]
        return (t[2], t[1])
    if layout == "wo_a":
        return (t[0] * t[2], t[1])
    if layout in ("gate_half", "up_half"):  # leaf [E, d, I] -> [E, 2I, d]
        return (t[0], 2 * t[2], t[1])
    if layout == "stacked_t":  # leaf [E, I, d] -> [E, d, I]
        return (t[0], t[2], t[1])
    raise ValueError(f"unknown layout {layout!r}")


# ---------------------------------------------------------------------------------------------
# Writing: the official name of every leaf
# ---------------------------------------------------------------------------------------------

def official_entries(flat_tree: dict[str, object], n_layers: int, n_mtp: int):
    """Yield ``(official_name, Placement)`` for every leaf of ``flat_tree`` (keys like
    ``params/layers_0/attn/wq_a/kernel``; values have ``.shape``), in checkpoint order:
    embed, layers, final norm/head/hc_head, MTP. Raises ValueError if a leaf has no rule."""
    covered = set()

    def emit(rules, official_prefix, our_prefix):
        for rule in rules:
            path = f"{rule.collection}/{our_prefix}{rule.path}"
            if path not in flat_tree:
                continue
            covered.add(path)
            if rule.layout == "expert":
                for e in range(flat_tree[path].shape[0]):
                    yield official_prefix + rule.official.format(e=e), Placement(path, rule.layout, e)
            else:
                yield official_prefix + rule.official, Placement(path, rule.layout)

    yield from emit(TOP_RULES[:1], "", "")
    for i in range(n_layers):
        yield from emit(BLOCK_RULES, f"layers.{i}.", f"layers_{i}/")
    yield from emit(TOP_RULES[1:], "", "")
    for j in range(n_mtp):
        yield from emit(MTP_RULES + BLOCK_RULES, f"mtp.{j}.", f"mtp_{j}/")
    missing = sorted(set(flat_tree) - covered)
    if missing:
        raise ValueError(f"no naming rule for leaves {missing[:5]} (v4jax/weights/naming.py)")


def hf_name(official: str) -> str:
    """The transformers in-memory name of a non-expert official name (``model.`` scope for the
    main model; MTP keeps ``mtp.{j}.`` since transformers has no MTP module)."""
    kind, idx, rest = scope_of(official)
    if kind == "top":
        rule = _TOP[rest]
        return rule.hf if rule.official == "head.weight" else "model." + rule.hf
    rule = (_MTP if kind == "mtp" else _BLOCK)[rest]
    return (f"model.layers.{idx}." if kind == "layers" else f"mtp.{idx}.") + rule.hf
