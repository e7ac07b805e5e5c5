"""Orbax workdirs: ``orbax.checkpoint.CheckpointManager`` steps holding the model variables
(``state``: ``{"params", "buffers"}``) and the config (``config``: the HF-style config.json dict).

This is the layout the trainer writes (it adds optimizer and data state as further items);
``load_workdir`` restores the latest (or a given) step as a ``V4Model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import jax
import orbax.checkpoint as ocp

from v4jax.api import V4Model
from v4jax.config import V4Config
from v4jax.model.layout import stack_variables, unstack_variables
from v4jax.params import abstract_variables
from v4jax.runtime import Runtime, split_runtime_kwargs

CHECKSUMS = "v4jax_checksums.json"


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


# -- checksums (written after a step commits; v4jax.train.checkpoints explains why) --------------

def _files(step_dir: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(root, f), step_dir)
            if rel != CHECKSUMS and not rel.startswith(CHECKSUMS + "."):
                out.append(rel)
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(step_dir: str) -> str:
    """Record size and SHA-256 of every file of a committed step; atomic (temp file, fsync, rename)."""
    entries = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "sha256": _sha256(os.path.join(step_dir, rel))}
               for rel in _files(step_dir)}
    path = os.path.join(step_dir, CHECKSUMS)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": entries}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def verify_step(step_dir: str) -> tuple[str, str]:
    """-> ``("ok", "")``, ``("unverified", why)`` (no checksum file) or ``("damaged", what)``."""
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
        return "unverified", "it has no checksum file"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return "damaged", f"its checksum file is unreadable ({type(e).__name__}: {e})"
    for rel, want in sorted(files.items()):
        p = os.path.join(step_dir, rel)
        if not os.path.isfile(p):
            return "damaged", f"file {rel} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return "damaged", f"file {rel} has {size} bytes, {want['size']} were written (truncated or overwritten)"
        if _sha256(p) != want["sha256"]:
            return "damaged", f"file {rel} does not match its SHA-256 (changed on disk since it was written)"
    return "ok", ""


def newest_good_step(workdir) -> int | None:
    """The newest step of ``workdir`` whose files match their checksums (steps without a checksum
    file count as good); damaged newer steps are skipped with a warning and left in place."""
    workdir = os.fspath(workdir)
    steps = sorted(int(d) for d in os.listdir(workdir) if d.isdigit() and os.path.isdir(os.path.join(workdir, d)))
    for step in reversed(steps):
        status, why = verify_step(os.path.join(workdir, str(step)))
        if status != "damaged":
            return step
        warnings.warn(f"checkpoint step {step} in {workdir} is damaged ({why}); using an older step", stacklevel=2)
    return None


def restore_variables(mngr: ocp.CheckpointManager, step: int, cfg: V4Config) -> dict:
    """The ``state`` item (``{"params", "buffers"}``) of ``step`` in the model's stacked layout;
    per-layer steps (older workdirs) are read in their layout and stacked."""
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
    if jax.process_index() == 0:
        write_checksums(os.path.join(os.path.abspath(os.fspath(workdir)), str(step)))


def is_workdir(path) -> bool:
    """A directory holding at least one orbax step (and no safetensors checkpoint)."""
    path = os.fspath(path)
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(d.isdigit() and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))


def load_workdir(workdir, step: int | None = None, **overrides):
    """Restore ``step`` (default: the latest) of an orbax workdir as a ``V4Model``."""
    if not os.path.isdir(os.fspath(workdir)):
        raise FileNotFoundError(f"no workdir {os.fspath(workdir)!r}")
    if step is None:
        step = newest_good_step(workdir)
        if step is None:
            raise FileNotFoundError(f"no (undamaged) checkpoint step in workdir {os.fspath(workdir)!r}")
    else:
        status, why = verify_step(os.path.join(os.fspath(workdir), str(step)))
        if status == "damaged":
            raise ValueError(f"checkpoint step {step} in {os.fspath(workdir)!r} is damaged: {why}")
    mngr = _manager(workdir)
    cfg_dict = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    cfg_kw, rt_kw = split_runtime_kwargs(overrides)
    cfg = V4Config.from_dict(cfg_dict, **cfg_kw)
    state = restore_variables(mngr, step, cfg)
    mngr.close()
    return V4Model(cfg, jax.tree.map(lambda x: x, state), Runtime.from_dict(rt_kw))
