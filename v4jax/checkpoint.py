"""Orbax workdirs: ``orbax.checkpoint.CheckpointManager`` steps holding the model variables
(``state``: ``{"params", "buffers"}``) and the config (``config``: the HF-style config.json dict).

This is the layout the trainer writes (it adds optimizer and data state as further items);
``load_workdir`` restores the latest (or a given) step as a ``V4Model``.
"""

from __future__ import annotations

import os
import re

import jax
import orbax.checkpoint as ocp

from v4jax.config import V4Config


class CheckpointLayoutError(ValueError):
    """A workdir step whose layout this version cannot resume (see the message for what to do)."""


def step_layout(mngr: ocp.CheckpointManager, step: int, item: str = "state") -> str:
    """``"stacked"`` (scanned layer stacks, ``stack_k/layer_j``: this version) or ``"per_layer"``
    (``layers_{i}``: workdirs written before the layer scan), read from the item's tree metadata."""
    meta = os.path.join(os.fspath(mngr.directory), str(step), item, "_METADATA")
    try:
        with open(meta) as f:
            text = f.read()
    except OSError:
        return "stacked"
    return "per_layer" if re.search(r'"layers_\d+"', text) else "stacked"


def restore_variables(mngr: ocp.CheckpointManager, step: int, cfg: V4Config) -> dict:
    """The ``state`` item (``{"params", "buffers"}``) of ``step`` in the model's stacked layout;
    per-layer steps (older workdirs) are read in their layout and stacked."""
    from v4jax.model.layout import stack_variables, unstack_variables
    from v4jax.params import abstract_variables

    abstract = abstract_variables(cfg)
    legacy = step_layout(mngr, step) == "per_layer"
    target = unstack_variables(cfg, abstract) if legacy else abstract
    # onto the default device, whatever mesh wrote the step (orbax would otherwise rebuild the
    # writer's sharding, which needs its devices); V4Model.shard(mesh) places it afterwards
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), target)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    state = dict(state)
    return stack_variables(cfg, state) if legacy else state


def _manager(workdir: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.fspath(workdir)),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save_workdir(workdir, variables: dict, cfg: V4Config, step: int, max_to_keep: int | None = 3) -> None:
    """Write step ``step`` (blocking until it is on disk)."""
    mngr = _manager(workdir, max_to_keep)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(variables),
                                            config=ocp.args.JsonSave(cfg.to_hf_dict())))
    mngr.wait_until_finished()
    mngr.close()


def is_workdir(path) -> bool:
    """A directory holding at least one orbax step (and no safetensors checkpoint)."""
    path = os.fspath(path)
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(d.isdigit() and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))


def load_workdir(workdir, step: int | None = None, **overrides):
    """Restore ``step`` (default: the latest) of an orbax workdir as a ``V4Model``."""
    from v4jax.api import V4Model

    mngr = _manager(workdir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint step in workdir {os.fspath(workdir)!r}")
    cfg_dict = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    from v4jax.runtime import Runtime, split_runtime_kwargs

    cfg_kw, rt_kw = split_runtime_kwargs(overrides)
    cfg = V4Config.from_dict(cfg_dict, **cfg_kw)
    state = restore_variables(mngr, step, cfg)
    mngr.close()
    return V4Model(cfg, jax.tree.map(lambda x: x, state), Runtime.from_dict(rt_kw))
