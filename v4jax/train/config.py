"""The run configuration: one frozen ``TrainConfig`` holding the model config (``V4Config``), the
optimizer config (``OptimizerConfig``) and the loop, loss and curriculum settings; named presets
(``tiny``, ``small``, ``flash``, ``pro``) and ``key=value`` overrides (``model.dim=128``,
``optim.peak_lr=1e-3``, ``batch_size=4``) for the command line.

Attention curriculum (spec 9, techniques 3.4), switched by step:

- ``dense``: steps ``[0, dense_attention_steps)``: CSA attends to every visible compressed entry
  (indexer unused and frozen); loss = LM + MTP + balance.
- ``indexer_warmup``: the next ``indexer_warmup_steps``: still dense; only the indexer trains, on
  the KL to the main attention (everything else frozen).
- ``sparse``: afterwards: top-k selection on; LM + MTP + balance train the model, the KL (on the
  selected entries, detached indexer input) trains the indexer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from v4jax.config import ConfigError, V4Config, preset
from v4jax.data.shards import UserData
from v4jax.data.sources import FileSource, TfdsSource
from v4jax.parallel.mesh import parse_mesh
from v4jax.runtime import Runtime
from v4jax.train.optimizer import OptimizerConfig

STAGES = ("dense", "indexer_warmup", "sparse")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; saved as ``train_config.json`` in the workdir."""

    model: V4Config
    optim: OptimizerConfig
    name: str = "custom"
    runtime: Runtime = Runtime()         # kernels and memory policy (not architecture)
    # data
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    data_dir: str | None = None          # tfds data_dir and data cache (default: ~/.cache/v4jax/tfds)
    tokenizer: str = "bpe"               # "bpe" (4096, shipped), "byte" (256 + 3 specials) or a tokenizer.json
    # your own data (v4jax.data.sources); all None: the shipped corpus
    data: str | None = None              # a directory, glob or file: .txt/.md, .jsonl/.json, .parquet
    tfds: str | None = None              # or NAME[:VERSION] of a TFDS dataset prepared under data_dir
    text_field: str = "text"             # the JSON field / Parquet column / TFDS feature holding the text
    eval_data: str | None = None         # held-out documents; None: a hash split of the training documents
    eval_fraction: float = 0.05          # ... holding out this fraction
    # length of the run (the LR schedule is in ``optim``; ``--steps`` only moves the stop point)
    total_steps: int = 1000
    # curriculum
    dense_attention_steps: int = 0
    indexer_warmup_steps: int = 0
    # losses
    mtp_weight: float = 0.3
    mtp_weight_after_decay: float = 0.1
    balance_weight: float = 1e-4
    bias_update_speed: float = 1e-3
    indexer_loss_weight: float = 1.0
    # loop
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = None       # None: the whole validation split
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    checkpoint_checksums: bool = True    # SHA-256 of every checkpoint file, checked on resume (v4jax.train.checkpoints)
    # numerical faults: a step whose loss or gradient is non-finite is never applied; after this many
    # in a row the run stops (its last checkpoint untouched)
    max_consecutive_skips: int = 20
    # loss spikes: a step whose LM loss exceeds spike_factor x the median of the last spike_window
    # applied steps is reported ("report": applied, counted, warned) or not applied ("skip");
    # None: off. Detection starts once the window holds max(8, spike_window // 4) losses.
    spike_factor: float | None = 3.0
    spike_window: int = 50
    spike_action: str = "report"
    # devices: None (one device) or a mesh spec "data=2,fsdp=2,expert=2" (v4jax.parallel.mesh);
    # not part of the run's identity: a checkpoint restores onto any mesh
    mesh: str | None = None

    def __post_init__(self):
        def need(cond, fld, rule):
            if not cond:
                raise ConfigError(f"TrainConfig.{fld}: {rule} (got {getattr(self, fld)!r})")

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        is_str = lambda v: isinstance(v, str) and v != ""
        need(isinstance(self.model, V4Config), "model", "must be a V4Config")
        need(isinstance(self.optim, OptimizerConfig), "optim", "must be an OptimizerConfig")
        need(isinstance(self.runtime, Runtime), "runtime", "must be a Runtime")
        need(is_str(self.name), "name", "must be a non-empty string")
        for f in ("seq_len", "batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "max_consecutive_skips", "spike_window"):
            need(is_int(getattr(self, f)) and getattr(self, f) >= 1, f, "must be an integer >= 1")
        for f in ("dense_attention_steps", "indexer_warmup_steps", "seed"):
            need(is_int(getattr(self, f)) and getattr(self, f) >= 0, f, "must be an integer >= 0")
        for f in ("mtp_weight", "mtp_weight_after_decay", "balance_weight", "bias_update_speed",
                  "indexer_loss_weight"):
            need(is_num(getattr(self, f)) and getattr(self, f) >= 0, f, "must be a finite number >= 0")
        for f in ("async_checkpointing", "checkpoint_checksums"):
            need(isinstance(getattr(self, f), bool), f, "must be true or false")
        need(self.data_dir is None or is_str(self.data_dir), "data_dir", "must be None or a path")
        need(self.spike_factor is None or (is_num(self.spike_factor) and self.spike_factor > 1), "spike_factor",
             "must be None (off) or a number > 1 (a multiple of the running median loss)")
        need(self.spike_action in ("report", "skip"), "spike_action", "must be 'report' or 'skip'")
        need(isinstance(self.tokenizer, str) and (self.tokenizer in ("bpe", "byte") or self.tokenizer.endswith(".json")
                                                  or os.path.isdir(self.tokenizer)), "tokenizer",
             "must be 'bpe', 'byte' or the path of a tokenizer.json (or of a directory holding one)")
        need(self.data is None or self.tfds is None, "data", "give data or tfds, not both")
        for f in ("data", "tfds", "eval_data"):
            need(getattr(self, f) is None or (isinstance(getattr(self, f), str) and getattr(self, f) != ""), f,
                 "must be None or a non-empty string")
        need(self.eval_data is None or self.data is not None or self.tfds is not None, "eval_data",
             "needs data or tfds (the shipped corpus has its own validation split)")
        need(isinstance(self.eval_fraction, (int, float)) and 0.0 < self.eval_fraction < 1.0, "eval_fraction",
             "must be in (0, 1)")
        need(isinstance(self.text_field, str) and self.text_field != "", "text_field", "must be a non-empty string")
        need(self.eval_batches is None or (is_int(self.eval_batches) and self.eval_batches >= 1), "eval_batches",
             "must be None or an integer >= 1")
        need(self.seq_len >= 2, "seq_len", "must be >= 2 (a row needs a next token for every position)")
        need(self.seq_len + 1 <= self.model.max_seq_len, "seq_len", "must be < model.max_seq_len")
        need(self.model.dtype in ("float32", "bfloat16"), "model", "dtype must be float32 or bfloat16")
        need(self.mesh is None or is_str(self.mesh), "mesh", "must be None or a mesh spec such as 'data=2,fsdp=4'")
        if self.mesh is not None:
            try:
                parse_mesh(self.mesh)
            except ConfigError as e:
                raise ConfigError(f"TrainConfig.mesh: {e}") from None
        has_csa = "csa" in self.model.layer_types
        need(has_csa or self.indexer_warmup_steps == 0, "indexer_warmup_steps",
             "must be 0 for a model without CSA layers")

    def user_data(self):
        """``shards.UserData`` for ``data`` / ``tfds`` (None: the shipped corpus). A TFDS dataset's own
        ``validation`` (else ``test``) split is held out when there is no ``eval_data``."""
        if self.data is None and self.tfds is None:
            return None
        if self.data is not None:
            train = FileSource(self.data, self.text_field)
        else:
            train = TfdsSource(self.tfds, "train", self.data_dir, self.text_field)
        held = None
        if self.eval_data is not None:
            held = FileSource(self.eval_data, self.text_field)
        elif self.tfds is not None:
            splits = train.splits()
            held = next((TfdsSource(self.tfds, s, self.data_dir, self.text_field) for s in ("validation", "test")
                         if s in splits), None)
        return UserData(train, held, float(self.eval_fraction))

    # -- curriculum ------------------------------------------------------------------------------
    def stage(self, step: int) -> str:
        """Attention stage of global step ``step`` (0-based): dense, indexer_warmup or sparse."""
        if step < self.dense_attention_steps:
            return "dense"
        if step < self.dense_attention_steps + self.indexer_warmup_steps:
            return "indexer_warmup"
        return "sparse"

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = dataclasses.asdict(self.model)
        d["optim"] = dataclasses.asdict(self.optim)
        d["runtime"] = self.runtime.to_dict()
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"TrainConfig has no field(s) {sorted(unknown)}")
        for part in ("model", "optim"):
            if not isinstance(d.get(part), dict):
                raise ConfigError(f"TrainConfig.{part}: must be an object of {part} settings "
                                  f"(got {d.get(part, 'nothing')!r})")
        model = dict(d["model"])
        # configs written before the runtime options left V4Config carry them in "model"
        legacy = {k: model.pop(k) for k in ("attention_impl", "moe_impl", "dense_compressed_attention") if k in model}
        legacy.pop("dense_compressed_attention", None)   # a stage flag now (SeqContext), never a run setting
        rt = {**legacy, **(d.get("runtime") or {})}
        d["model"] = _build(V4Config, model)
        d["optim"] = _build(OptimizerConfig, d["optim"])
        try:
            d["runtime"] = Runtime.from_dict(rt)
        except ValueError as e:
            raise ConfigError(f"TrainConfig.runtime: {e}") from None
        try:
            return cls(**d)
        except TypeError as e:       # a missing required field
            raise ConfigError(f"TrainConfig: {e}") from None

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"run config {os.fspath(path)!r} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"run config {os.fspath(path)!r}: {e}") from None

    def override(self, assignments: list[str]) -> "TrainConfig":
        """Apply ``key=value`` strings; ``model.`` / ``optim.`` / ``runtime.`` prefixes reach the nested configs.
        Values are parsed as JSON when possible (``1e-3``, ``true``, ``[...]``), else taken as text."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {"model": {}, "optim": {}, "runtime": {}}
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"--set expects key=value, got {a!r}")
            key, raw = a.split("=", 1)
            key = key.strip()
            try:
                val = json.loads(raw)
            except json.JSONDecodeError:
                val = raw
            part, _, sub = key.partition(".")
            if sub:
                if part not in nested:
                    raise ConfigError(f"--set {key}: unknown section {part!r} (use model., optim. or runtime.)")
                nested[part][sub] = val
            else:
                top[key] = val
        d = self.to_dict()
        for part, kv in nested.items():
            for k, v in kv.items():
                if k not in d[part]:
                    raise ConfigError(f"--set {part}.{k}: {part} has no field {k!r}")
                d[part][k] = v
        for k, v in top.items():
            if k not in d or k in ("model", "optim", "runtime"):
                raise ConfigError(f"--set {k}: TrainConfig has no field {k!r}")
            d[k] = v
        return TrainConfig.from_dict(d)


def _build(cls, d: dict[str, Any]):
    """A frozen dataclass from a JSON dict, turning lists back into tuples where the field is a tuple."""
    hints = typing.get_type_hints(cls)
    kw = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    for k, v in d.items():
        t = hints.get(k)
        origin = typing.get_origin(t)
        if isinstance(v, list) and (origin is tuple or t is tuple or (origin in (typing.Union, types.UnionType)
                                                                      and any(typing.get_origin(a) is tuple
                                                                              for a in typing.get_args(t)))):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kw[k] = v
    try:
        return cls(**kw)
    except TypeError as e:           # a missing required field
        raise ConfigError(f"{cls.__name__}: {e}") from None


# -- presets ------------------------------------------------------------------------------------

def _tiny() -> TrainConfig:
    """The tiny model (spec 11) on a 2-core CPU within 15 minutes: 4 x 256-token rows per step,
    110 steps, LR 3e-3 (10 warm-up steps, cosine from step 80); dense CSA for 20 steps, a 10-step
    indexer warm-up, then sparse. Routed experts use the exact dense path (faster on CPU for 16
    experts). Scale ``batch_size``/``total_steps`` up on an accelerator (spec 11: 8-16 x 256)."""
    total = 110
    return TrainConfig(
        name="tiny", model=preset("tiny"), seq_len=256, batch_size=4, total_steps=total,
        optim=OptimizerConfig(peak_lr=3e-3, final_lr=3e-4, warmup_steps=10, decay_start=80, total_steps=total),
        dense_attention_steps=20, indexer_warmup_steps=10,
        log_every=5, eval_every=20, eval_batches=8, checkpoint_every=50)


def _small() -> TrainConfig:
    total = 5000
    return TrainConfig(
        name="small", model=preset("small"), seq_len=512, batch_size=16, total_steps=total,
        optim=OptimizerConfig(peak_lr=1e-3, final_lr=1e-4, warmup_steps=200, decay_start=int(total * 0.8),
                              total_steps=total),
        dense_attention_steps=int(total * 0.2), indexer_warmup_steps=200,
        eval_every=500, checkpoint_every=500)


def _paper(model: str, peak: float) -> TrainConfig:
    """The report's recipe (spec 9) at its first sequence length (4K). The real runs use batches of
    tens of millions of tokens over a pod: set ``batch_size`` for your mesh."""
    total = 100_000
    return TrainConfig(
        name=model, model=preset(model, dtype="bfloat16"), seq_len=4096, batch_size=64, total_steps=total,
        # Newton-Schulz with bf16 operands (fp32 accumulation), as V4 runs it at scale (spec 9)
        optim=OptimizerConfig(peak_lr=peak, final_lr=peak / 10, warmup_steps=2000, decay_start=int(total * 0.9),
                              total_steps=total, muon_ns_dtype="bfloat16"),
        dense_attention_steps=int(total * 0.3), indexer_warmup_steps=1000,
        # expert parallelism with a capacity (#21): dispatch memory c x the balanced load whatever
        # the expert shards, pairs beyond it dropped and counted (moe_dropped); null: dropless
        runtime=Runtime(ep_capacity=1.5),
        log_every=50, eval_every=2000, eval_batches=50, checkpoint_every=1000)


_PRESETS = {"tiny": _tiny, "small": _small, "flash": lambda: _paper("flash", 2.7e-4),
            "pro": lambda: _paper("pro", 2.0e-4)}


def train_preset(name: str, overrides: list[str] | None = None) -> TrainConfig:
    """A named run preset (``tiny``, ``small``, ``flash``, ``pro``) or a ``train_config.json`` path,
    with ``key=value`` overrides."""
    if name in _PRESETS:
        cfg = _PRESETS[name]()
    elif os.path.isfile(name):
        cfg = TrainConfig.from_json(name)
    else:
        raise ConfigError(f"unknown run config {name!r}: use one of {sorted(_PRESETS)} or a JSON file")
    return cfg.override(overrides or [])
