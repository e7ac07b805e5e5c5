"""Training checkpoints that survive faults: orbax ``CheckpointManager`` steps, a checksum file per
step, and a restart that falls back to the newest good step.

Orbax writes a step under a temporary name and renames it when every file is on disk, so a
process killed mid-write leaves ``<step>.orbax-checkpoint-tmp-*`` and never a half-written
``<step>``. What orbax does not catch is damage after the fact: a bit flipped in a data file of
an OCDBT checkpoint restores silently with wrong values (checked: orbax 0.12.8 has no checksum of
its own). So after each save commits, ``write_checksums`` records the size and SHA-256 of every
file of the step in ``<step>/v4jax_checksums.json`` (written atomically), and a restart
(``resume``) checks the newest step first:

- damaged (a file missing, truncated, grown or changed) or failing to restore: a warning naming
  the step and the file, the step moved aside to ``<workdir>/corrupt/`` (never deleted; a
  ``.reason.txt`` beside it says why), and the next older step tried;
- an unfinished write (``*.orbax-checkpoint-tmp-*``): moved aside the same way;
- a step without a checksum file (written by an older v4jax, or killed between the commit and
  the checksum write): restored without verification, with a warning.

A step of another model config or of another parameter layout is not damage: it raises
``CheckpointMismatchError`` and nothing on disk changes.
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from v4jax.checkpoint import CHECKSUMS, CheckpointLayoutError, step_layout, verify_step, write_checksums  # noqa: F401
from v4jax.config import ConfigError
from v4jax.params import abstract_variables
from v4jax.train.config import TrainConfig
from v4jax.train.step import all_finite, state_shardings

CORRUPT_DIR = "corrupt"
# version of what a training checkpoint holds (items, their trees, the meta keys); a reader
# refuses a newer one. 1: the scanned layer stack (``stack_k/layer_j``) with Muon/AdamW state.
FORMAT = 1
_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class NonFiniteError(RuntimeError):
    """Training produced non-finite values for too many consecutive steps (nothing was saved)."""


class CheckpointMismatchError(ConfigError):
    """A checkpoint of another model config or parameter layout than the run's (nothing is changed)."""


def checkpoint_manager(workdir: str, cfg: TrainConfig | None = None, create: bool = True) -> ocp.CheckpointManager:
    keep = cfg.keep_checkpoints if cfg else None
    async_ = cfg.async_checkpointing if cfg else False
    return ocp.CheckpointManager(
        os.path.abspath(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=async_))


def latest_step(workdir: str) -> int | None:
    """The newest committed step of ``workdir`` (None when there is none or no such directory);
    reads the directory only (creates nothing)."""
    steps = committed_steps(workdir)
    return steps[-1] if steps else None


def committed_steps(workdir: str) -> list[int]:
    if not os.path.isdir(workdir):
        return []
    return sorted(int(d) for d in os.listdir(workdir) if d.isdigit() and os.path.isdir(os.path.join(workdir, d)))


def save_checkpoint(mngr: ocp.CheckpointManager, state: dict, cfg: TrainConfig, data_state, extra: dict | None = None) -> int:
    """Queue an (async) save of ``state`` at its step; refuses non-finite values. ``extra``: more
    JSON for the ``meta`` item (the loop's loss window)."""
    step = int(state["step"])
    if not all_finite((state["params"], state["buffers"], state["opt_state"])):
        raise NonFiniteError(f"refusing to checkpoint step {step}: the state holds non-finite values")
    meta = {"step": step, "format": FORMAT, "data": data_state, "train_config": cfg.to_dict(), **(extra or {})}
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": state["params"], "buffers": state["buffers"]}),
        config=ocp.args.JsonSave(cfg.model.to_hf_dict()),
        train_state=ocp.args.StandardSave({"opt_state": state["opt_state"], "step": state["step"],
                                           "rng": state["rng"]}),
        meta=ocp.args.JsonSave(meta)))
    return step


# -- moving damaged steps aside ---------------------------------------------------------------------

def set_aside(workdir: str, name: str, reason: str) -> str:
    """Move ``workdir/name`` to ``workdir/corrupt/name[-k]`` with a ``.reason.txt``; -> the new path."""
    dest_dir = os.path.join(workdir, CORRUPT_DIR)
    os.makedirs(dest_dir, exist_ok=True)
    dest, k = os.path.join(dest_dir, name), 1
    while os.path.exists(dest):
        dest, k = os.path.join(dest_dir, f"{name}-{k}"), k + 1
    os.replace(os.path.join(workdir, name), dest)
    with open(dest + ".reason.txt", "w") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}\n")
    return dest


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# -- compatibility --------------------------------------------------------------------------------

def _tree_paths(item_dir: str) -> set[str] | None:
    try:
        with open(os.path.join(item_dir, "_METADATA")) as f:
            tree = json.load(f)["tree_metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"/".join(str(k["key"]) for k in v["key_metadata"]) for v in tree.values()}


def _abstract_paths(tree) -> set[str]:
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return {"/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _model_diff(saved: dict, cfg: TrainConfig) -> list[str]:
    now = cfg.to_dict()["model"]
    return [f"{k}={saved.get(k)!r} (this run: {now.get(k)!r})" for k in sorted(set(saved) | set(now))
            if k not in ("name",) and saved.get(k) != now.get(k)]


def check_compatible(workdir: str, step: int, cfg: TrainConfig, abstract: dict) -> None:
    """Raise ``CheckpointMismatchError`` when ``step`` holds another model config, a newer
    checkpoint format or another parameter tree than ``cfg``'s; read-only. ``abstract``: the
    run's ``{"state": ..., "train_state": ...}`` trees."""
    step_dir = os.path.join(workdir, str(step))
    where = f"checkpoint step {step} in {workdir}"
    try:
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None           # damage: the restore attempt decides
    if meta is not None:
        fmt = meta.get("format", 1)
        if fmt > FORMAT:
            raise CheckpointMismatchError(f"{where} has checkpoint format {fmt}, written by a newer v4jax (this "
                                          f"version reads format {FORMAT}): upgrade v4jax to resume it")
        saved = (meta.get("train_config") or {}).get("model")
        if saved is not None:
            diff = _model_diff(saved, cfg)
            if diff:
                raise CheckpointMismatchError(
                    f"{where} is of another model config: {'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}. "
                    f"Resume it with its own config (v4jax-train --workdir {workdir} reads train_config.json) or "
                    f"start a new workdir")
    for item in ("state", "train_state"):
        paths = _tree_paths(os.path.join(step_dir, item))
        if paths is None:
            continue
        if item == "state" and any(re.match(r"params/layers_\d+/", p) for p in paths):
            raise _per_layer_error(where)
        # one way only: orbax also records empty nodes (optax's EmptyState) that hold no leaf here
        missing = sorted(_abstract_paths(abstract[item]) - paths)
        if missing:
            raise CheckpointMismatchError(
                f"{where} holds another parameter layout in {item!r}: it lacks {len(missing)} leaves this run "
                f"needs, e.g. {missing[:3]}. It was written by another version of v4jax or for another model; "
                f"start a new workdir")


def _per_layer_error(where: str):
    return CheckpointLayoutError(
        f"{where} was written before the scanned layer stack (per-layer parameters) and its optimizer "
        f"state cannot be resumed by this version. Its weights still load: "
        f"v4jax.checkpoint.load_workdir(workdir) gives a V4Model; start a new run from model.variables.")


# -- restore ------------------------------------------------------------------------------------

def _placed(abstract, shardings):
    """``ShapeDtypeStruct`` targets carrying the shardings to restore onto."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_items(cfg: TrainConfig, tx, mesh=None) -> dict:
    """The ``state`` and ``train_state`` trees of a checkpoint of ``cfg``, with the shardings to
    restore onto (``mesh``'s, else the default device)."""
    abstract_vars = abstract_variables(cfg.model)
    abstract_opt = jax.eval_shape(tx.init, abstract_vars["params"])
    abstract_train = {"opt_state": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32),
                      "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_vars = _placed(abstract_vars, jax.tree.map(lambda _: one, abstract_vars))
        abstract_train = _placed(abstract_train, jax.tree.map(lambda _: one, abstract_train))
    else:
        sh = state_shardings(cfg, tx, mesh)
        abstract_vars = _placed(abstract_vars, {k: sh[k] for k in abstract_vars})
        abstract_train = _placed(abstract_train, {k: sh[k] for k in abstract_train})
    return {"state": abstract_vars, "train_state": abstract_train}


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, cfg: TrainConfig, tx, mesh=None,
                       with_meta: bool = False):
    """-> (state, data-iterator state[, meta]) of checkpoint ``step``, restored straight onto
    ``mesh``'s shardings (any mesh: orbax reshards on read) or onto the default device. Checks
    compatibility first (``CheckpointMismatchError``); integrity is ``resume``'s job."""
    if step_layout(mngr, step) == "per_layer":
        raise _per_layer_error(f"checkpoint step {step} in {os.fspath(mngr.directory)}")
    abstract = abstract_items(cfg, tx, mesh)
    check_compatible(os.fspath(mngr.directory), step, cfg, abstract)
    got = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract["state"]), train_state=ocp.args.StandardRestore(abstract["train_state"]),
        meta=ocp.args.JsonRestore()))
    variables, train = got["state"], got["train_state"]
    state = {"step": jnp.asarray(train["step"], jnp.int32), "params": variables["params"],
             "buffers": variables.get("buffers", {}), "opt_state": train["opt_state"], "rng": train["rng"]}
    if int(state["step"]) != step:
        raise ValueError(f"checkpoint step {step} holds the state of step {int(state['step'])}")
    if not all_finite((state["params"], state["buffers"], state["opt_state"])):
        raise ValueError(f"checkpoint step {step} restored non-finite values")
    return (state, got["meta"]["data"], got["meta"]) if with_meta else (state, got["meta"]["data"])


def resume(workdir: str, cfg: TrainConfig, tx, mesh=None, log=print, primary: bool = True):
    """Restore the newest good checkpoint of ``workdir``: -> ``(state, data_state, meta)`` or None
    when there is none. Unfinished writes and damaged steps are moved aside (see the module
    docstring) with a warning naming the step; a step of another config or layout raises
    ``CheckpointMismatchError`` before anything moves. Every process calls this (the restore is
    collective); process 0 alone moves directories."""
    workdir = os.path.abspath(workdir)
    abstract = abstract_items(cfg, tx, mesh)
    steps = committed_steps(workdir)
    if steps and verify_step(os.path.join(workdir, str(steps[-1])))[0] != "damaged":
        check_compatible(workdir, steps[-1], cfg, abstract)   # another config: refused before anything moves
    if primary and os.path.isdir(workdir):
        for d in sorted(os.listdir(workdir)):
            m = _TMP.match(d)
            if m and os.path.isdir(os.path.join(workdir, d)):
                dest = set_aside(workdir, d, f"unfinished write of step {m.group(1)} (the process stopped while "
                                             f"saving it)")
                log(f"v4jax-train: WARNING an unfinished checkpoint write of step {m.group(1)} (the run was "
                    f"stopped while saving it) was moved aside to {dest}")
    _sync("v4jax-resume-tmp")
    for step in reversed(committed_steps(workdir)):
        step_dir = os.path.join(workdir, str(step))
        status, why = verify_step(step_dir)
        problem = why if status == "damaged" else None
        if problem is None:
            check_compatible(workdir, step, cfg, abstract)      # raises: nothing moved
            mngr = checkpoint_manager(workdir, cfg)
            try:
                state, data_state, meta = restore_checkpoint(mngr, step, cfg, tx, mesh, with_meta=True)
            except (CheckpointLayoutError, CheckpointMismatchError):
                raise
            except Exception as e:   # noqa: BLE001 - any failure to read a step means: do not use it
                problem = f"it does not restore ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            finally:
                mngr.close()
        if problem is None:
            if status == "unverified":
                log(f"v4jax-train: WARNING checkpoint step {step} has no checksum file (written by an older "
                    f"v4jax, or the run stopped right after saving it); restored without verification")
            return state, data_state, meta
        older = [s for s in committed_steps(workdir) if s < step]
        if primary:
            dest = set_aside(workdir, str(step), f"checkpoint step {step}: {problem}")
            log(f"v4jax-train: WARNING checkpoint step {step} is damaged: {problem}. Moved aside to {dest}; "
                + (f"trying step {older[-1]}" if older else "no older checkpoint: starting from step 0"))
        _sync(f"v4jax-resume-{step}")
    return None
