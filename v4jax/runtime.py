"""Implementation choices: how the model is computed, never what it computes.

``V4Config`` is the architecture (spec section 1); ``Runtime`` picks kernels and memory policy.
Two models with the same config and variables give the same logits (within fp32 noise) under any
``Runtime``: the choices are tested against each other and against the dense oracle.

* ``attention``: ``"xla"`` (default): blockwise banded window, top-k gather for sparse CSA,
  online-softmax blocks over the entries for HCA / dense CSA, a chunked indexer with a running
  top-k (``v4jax/attention/xla.py``); O(T * (window + k)) memory for CSA, O(T * block) for HCA.
  ``"reference"``: the dense masked jnp oracle (``v4jax/attention/core.py``), O(T^2) memory.
  ``"pallas"``: ``kernels_pallas`` (TPU Mosaic / GPU Triton / CPU interpret) for whole sequences.
* ``moe``: the dropless expert dispatch (``v4jax/moe/experts.py``), all with the selected experts'
  FLOPs except ``"dense"``. ``"auto"`` (default): ``"grouped"`` on CPU, ``"tokamax"`` on GPU/TPU
  when the optional tokamax package is installed, else ``"ragged"``. ``"grouped"``: tokens
  gathered into ``[E, C, d]`` groups at a capacity level picked at run time from the largest
  expert's load, matmuls against the expert weights as they are (w1|w3 fused), ``"blocked"`` when
  no level fits or at decode; ``"blocked"``: sorted
  fixed-size row blocks, one batched matmul per projection (at decode reads only the selected
  experts' weights); ``"ragged"``: ``jax.lax.ragged_dot``; ``"tokamax"``: ``tokamax.ragged_dot``;
  ``"dense"``: every expert on every token (E/K x the FLOPs; the oracle).
* ``remat``: rematerialisation of each scanned layer in the backward pass: ``"none"``, ``"full"``
  (save nothing), ``"save_matmuls"`` (keep matmul outputs without batch dims), ``"offload"``
  (move those matmul outputs to host memory; needs a backend with pinned host memory).
* ``q_chunk``: query tokens per block of the ``xla`` attention (None: its default).
* ``ep_capacity``: under a mesh with an ``expert`` axis (``v4jax.moe.expert_parallel``), None
  (default): dropless, each device's expert blocks sized for every pair landing on it; a factor
  ``c > 0``: sized for ``c`` times the balanced load, the pairs beyond dropped and counted.
* ``index_select``: how the ``xla`` attention's chunked indexer keeps its running top-k over key
  blocks (whole sequences; cached chunks score their few rows at once): ``"top_k"`` (default:
  ``lax.top_k`` over [running | block]) or ``"threshold"`` (exact k-th value by bisection on an
  order-preserving integer key, then compaction; no sort). Same selected set, so the same
  attention output (within fp32 summation order).
* ``unroll``: a layer stack of at most this many repeats is unrolled instead of looped (same
  parameters and values; the scan's per-iteration slicing and residual stacking dominate shallow
  stacks, and compile time only grows with the unrolled layers). ``0``: scan every stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ATTENTION_IMPLS = ("xla", "reference", "pallas")
MOE_IMPLS = ("auto", "grouped", "blocked", "ragged", "tokamax", "dense")
REMAT_POLICIES = ("none", "full", "save_matmuls", "offload")
INDEX_SELECTS = ("top_k", "threshold")

# Old V4Config field names that are runtime options now (accepted by load_hf / V4Model.init).
LEGACY_KEYS = {"attention_impl": "attention", "moe_impl": "moe"}


@dataclass(frozen=True)
class Runtime:
    attention: str = "xla"
    moe: str = "auto"
    remat: str = "none"
    q_chunk: int | None = None
    unroll: int = 2
    ep_capacity: float | None = None
    index_select: str = "top_k"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"Runtime.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.moe not in MOE_IMPLS:
            raise ValueError(f"Runtime.moe must be one of {MOE_IMPLS}, got {self.moe!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Runtime.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.q_chunk is not None and (not isinstance(self.q_chunk, int) or isinstance(self.q_chunk, bool)
                                        or self.q_chunk < 1):
            raise ValueError(f"Runtime.q_chunk must be a positive integer or None, got {self.q_chunk!r}")
        if self.ep_capacity is not None and (isinstance(self.ep_capacity, bool)
                                             or not isinstance(self.ep_capacity, (int, float))
                                             or not self.ep_capacity > 0):
            raise ValueError(f"Runtime.ep_capacity must be None or a number > 0, got {self.ep_capacity!r}")
        if self.index_select not in INDEX_SELECTS:
            raise ValueError(f"Runtime.index_select must be one of {INDEX_SELECTS}, got {self.index_select!r}")
        if self.index_select != "top_k" and self.attention != "xla":
            raise ValueError(f"Runtime.index_select={self.index_select!r} is a choice of the 'xla' attention; "
                             f"attention={self.attention!r} always selects with top_k")
        if not isinstance(self.unroll, int) or isinstance(self.unroll, bool) or self.unroll < 0:
            raise ValueError(f"Runtime.unroll must be an integer >= 0, got {self.unroll!r}")

    def replace(self, **kw) -> "Runtime":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Runtime":
        d = dict(d or {})
        for old, new in LEGACY_KEYS.items():
            if old in d:
                d[new] = d.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Runtime has no option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def split_runtime_kwargs(kw: dict) -> tuple[dict, dict]:
    """Split keyword overrides into (config fields, runtime options). Runtime options may be given
    by their names (``attention``, ``moe``, ``remat``, ``q_chunk``, ``unroll``) or the old config names
    (``attention_impl``, ``moe_impl``)."""
    names = {f.name for f in dataclasses.fields(Runtime)} | set(LEGACY_KEYS)
    rt = {k: v for k, v in kw.items() if k in names}
    cfg = {k: v for k, v in kw.items() if k not in names}
    return cfg, rt


def remat_policy(name: str):
    """``jax.checkpoint`` policy for ``Runtime.remat`` (None for "none")."""
    import jax

    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return cp.nothing_saveable
    if name == "save_matmuls":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload":
        return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"unknown remat policy {name!r}")
