"""Orbax workdirs: ``orbax.checkpoint.CheckpointManager`` steps holding the model variables
(``state``: ``{"params", "buffers"}``) and the config (``config``: the HF-style config.json dict).

This is the layout the trainer writes (it adds optimizer and data state as further items);
``load_workdir`` restores the latest (or a given) step as a ``V4Model``.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from v4jax.config import V4Config


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
    from v4jax.params import abstract_variables

    mngr = _manager(workdir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint step in workdir {os.fspath(workdir)!r}")
    cfg_dict = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    cfg = V4Config.from_dict(cfg_dict, **overrides)
    abstract = abstract_variables(cfg)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    mngr.close()
    return V4Model(cfg, jax.tree.map(lambda x: x, dict(state)))
