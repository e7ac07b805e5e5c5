"""The scanned layer stack: how a V4 layer schedule is cut into runs of a repeating pattern, and the
conversion between the per-layer ("canonical") variable layout and the stacked one.

V4's schedules repeat (Flash: two window layers, then CSA/HCA alternating; Pro: two HCA layers,
then alternating; the first ``n_hash_layers`` layers route by token id). A layer's *kind* is
``(layer_type, hash_routed)``: layers of one kind have identical parameter shapes. ``layer_plan``
cuts the schedule into ``Stack``s: a pattern of kinds repeated ``repeats`` times. Each stack is
one ``nn.scan`` over its repeats, with its parameters stacked on a leading axis whose logical name
is ``"layers"`` (``v4jax.sharding.RULES``), so compile time grows with the number of distinct
stacks, not with depth. Flash's 43 layers become 3 stacks (window x2, hash CSA x1, (HCA, CSA) x20).

Variables of the model: ``stack_{k}/layer_{j}/...`` with a leading ``[repeats]`` axis, where
``j`` is the position in the stack's pattern. Layer ``i`` is ``stack k, repeat r, position j``
with ``i = start_k + r * len(pattern_k) + j``. The canonical layout (``layers_{i}/...``, what the
official and ``transformers`` checkpoints name) is produced by ``unstack_layers`` and read back by
``stack_layers``, bit-identically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import numpy as np

from v4jax.config import V4Config

Kind = tuple[str, bool]   # (layer_type, hash_routed)

STACK_AXIS = "layers"     # logical axis name of the stacked layer dimension
_LAYER_KEY = re.compile(r"layers_(\d+)$")
_STACK_KEY = re.compile(r"stack_(\d+)$")


@dataclass(frozen=True)
class Stack:
    start: int                  # first layer index
    pattern: tuple[Kind, ...]   # kinds of one repeat, in order
    repeats: int

    @property
    def n_layers(self) -> int:
        return len(self.pattern) * self.repeats

    def layer_index(self, r: int, j: int) -> int:
        return self.start + r * len(self.pattern) + j


def layer_kinds(cfg: V4Config) -> tuple[Kind, ...]:
    return tuple((cfg.layer_types[i], cfg.is_hash_layer(i)) for i in range(cfg.n_layers))


def plan_kinds(kinds: tuple[Kind, ...], max_period: int = 4) -> tuple[Stack, ...]:
    """Greedy: at each position take the period (1..max_period) whose repeats cover the most layers
    (ties: the shorter period); a pattern that does not repeat becomes a stack of one layer."""
    out, i, n = [], 0, len(kinds)
    while i < n:
        best_p, best_r = 1, 1
        for p in range(1, max_period + 1):
            if i + p > n:
                break
            pat = kinds[i:i + p]
            r = 1
            while i + (r + 1) * p <= n and kinds[i + r * p: i + (r + 1) * p] == pat:
                r += 1
            if r >= 2 and r * p > best_r * best_p:
                best_p, best_r = p, r
        out.append(Stack(i, tuple(kinds[i:i + best_p]), best_r))
        i += best_p * best_r
    return tuple(out)


def layer_plan(cfg: V4Config) -> tuple[Stack, ...]:
    """The stacks of ``cfg``'s schedule (cached by value: configs are frozen and hashable)."""
    return _plan_cached(layer_kinds(cfg))


_PLANS: dict = {}


def _plan_cached(kinds):
    if kinds not in _PLANS:
        _PLANS[kinds] = plan_kinds(kinds)
    return _PLANS[kinds]


def locate(cfg: V4Config, i: int) -> tuple[int, int, int]:
    """Layer ``i`` -> (stack k, repeat r, pattern position j)."""
    for k, st in enumerate(layer_plan(cfg)):
        if st.start <= i < st.start + st.n_layers:
            r, j = divmod(i - st.start, len(st.pattern))
            return k, r, j
    raise IndexError(f"layer {i} is outside the model's {cfg.n_layers} layers")


def _slice(x, r):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[r]


def _stack(xs):
    x0 = xs[0]
    if isinstance(x0, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs),) + tuple(x0.shape), x0.dtype)
    if isinstance(x0, np.ndarray) or np.isscalar(x0):
        return np.stack(xs)
    import jax.numpy as jnp

    return jnp.stack(xs)


def is_stacked(tree: dict) -> bool:
    return isinstance(tree, dict) and any(_STACK_KEY.match(k) for k in tree)


def is_canonical(tree: dict) -> bool:
    return isinstance(tree, dict) and any(_LAYER_KEY.match(k) for k in tree)


def unstack_layers(cfg: V4Config, tree: dict) -> dict:
    """A variable collection (``params`` or ``buffers``) in the model's stacked layout -> the same
    with ``layers_{i}`` sub-trees (arrays, numpy arrays or ``ShapeDtypeStruct`` leaves)."""
    if not is_stacked(tree):
        return tree
    out = {k: v for k, v in tree.items() if not _STACK_KEY.match(k)}
    for k, st in enumerate(layer_plan(cfg)):
        sub = tree.get(f"stack_{k}")
        if sub is None:
            continue
        for r in range(st.repeats):
            for j in range(len(st.pattern)):
                if f"layer_{j}" in sub:
                    out[f"layers_{st.layer_index(r, j)}"] = jax.tree.map(lambda x: _slice(x, r), sub[f"layer_{j}"])
    return out


def stack_layers(cfg: V4Config, tree: dict) -> dict:
    """Inverse of ``unstack_layers``: ``layers_{i}`` sub-trees -> ``stack_{k}/layer_{j}`` with a
    leading repeats axis. Raises ``KeyError`` naming the first missing layer."""
    if not is_canonical(tree):
        return tree
    out = {k: v for k, v in tree.items() if not _LAYER_KEY.match(k)}
    for k, st in enumerate(layer_plan(cfg)):
        group = {}
        for j in range(len(st.pattern)):
            names = [f"layers_{st.layer_index(r, j)}" for r in range(st.repeats)]
            present = [n in tree for n in names]
            if not any(present):
                continue
            if not all(present):
                raise KeyError(f"layer {names[present.index(False)]} is missing")
            group[f"layer_{j}"] = jax.tree.map(lambda *xs: _stack(xs), *[tree[n] for n in names])
        if group:
            out[f"stack_{k}"] = group
    extra = [k for k in tree if _LAYER_KEY.match(k) and int(_LAYER_KEY.match(k).group(1)) >= cfg.n_layers]
    if extra:
        raise KeyError(f"{extra[0]} is beyond the model's {cfg.n_layers} layers")
    return out


def unstack_variables(cfg: V4Config, variables: dict) -> dict:
    """``{"params": ..., "buffers": ...}`` (any collections) -> canonical per-layer layout."""
    return {col: unstack_layers(cfg, tree) for col, tree in variables.items()}


def stack_variables(cfg: V4Config, variables: dict) -> dict:
    return {col: stack_layers(cfg, tree) for col, tree in variables.items()}


def layer_tree(cfg: V4Config, tree: dict, i: int) -> dict:
    """The sub-tree of layer ``i`` of a stacked (or canonical) collection."""
    if is_canonical(tree):
        return tree[f"layers_{i}"]
    k, r, j = locate(cfg, i)
    return jax.tree.map(lambda x: _slice(x, r), tree[f"stack_{k}"][f"layer_{j}"])
