"""The pure, jitted training and evaluation steps.

``state`` is a plain pytree ``{"step", "params", "buffers", "opt_state", "rng"}`` (``buffers``: the
router biases and hash tables, outside the gradient); ``train_step(state, batch) -> (state,
metrics)`` is jitted once per curriculum stage (see ``v4jax.train.config``).

A step whose loss or gradient is not finite applies nothing (parameters, optimizer state and
biases stay as they were; the step counter advances) and reports ``skipped = nonfinite = 1``.
``train_step(state, batch, loss_limit)`` also flags ``spike = 1`` when the LM loss exceeds
``loss_limit`` (the loop passes ``spike_factor`` x the running median); with
``spike_action="skip"`` such a step is not applied either (``skipped = 1``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from v4jax.api import init_variables
from v4jax.attention.context import SeqContext
from v4jax.model.transformer import Transformer
from v4jax.parallel.mesh import batch_sharding, mesh_context, replicated, under_mesh
from v4jax.parallel.placement import state_shardings as _shardings
from v4jax.params import abstract_variables
from v4jax.train.config import STAGES, TrainConfig
from v4jax.train.losses import balance_loss, indexer_loss, masked_cross_entropy, target_masks, updated_router_biases

State = dict[str, Any]


def _is_indexer(path) -> bool:
    return any(getattr(k, "key", None) == "indexer" for k in path)


def stage_id(cfg: TrainConfig, step) -> jnp.ndarray:
    """Curriculum stage of ``step`` as a traced int (0 dense, 1 indexer_warmup, 2 sparse); a
    Python 2 when the run has no dense or warm-up steps (nothing is traced for switched-off stages)."""
    d, w = cfg.dense_attention_steps, cfg.indexer_warmup_steps
    if d == 0 and w == 0:
        return 2
    return (step >= d).astype(jnp.int32) + (step >= d + w).astype(jnp.int32)


def _as_id(stage):
    """A stage name -> its Python int id (static: the step is specialised to it); ids pass through."""
    return STAGES.index(stage) if isinstance(stage, str) else stage


def _train_flags(sid):
    """(indexer trains, everything else trains) in stage ``sid``: dense -> the indexer is unused
    and frozen; indexer_warmup -> only the indexer; sparse -> all."""
    return sid >= 1, sid != 1


def _mask_by_path(new, old, sid):
    """Per leaf: the new value where the stage trains the leaf's parameter (scalar counters always),
    the old one otherwise. Works on parameter trees and on optimizer states that mirror them."""
    idx_on, rest_on = _train_flags(sid)

    def pick(path, n, o):
        if jnp.ndim(n) == 0:
            return n
        on = idx_on if _is_indexer(path) else rest_on
        if isinstance(on, bool):   # static stage: no select at all
            return n if on else o
        return jnp.where(on, n, o)

    return jax.tree_util.tree_map_with_path(pick, new, old)


def init_state(cfg: TrainConfig, tx: optax.GradientTransformation, variables: dict | None = None,
               mesh=None) -> State:
    """Fresh state: model variables (``V4Model.init`` with ``cfg.seed``) and optimizer state.
    With ``mesh`` every leaf is created directly with its sharding (``state_shardings``): no
    device ever holds a full copy of a sharded parameter; the values equal the one-device ones."""
    if mesh is None:
        if variables is None:
            variables = init_variables(cfg.model, cfg.seed, cfg.runtime)
        params = variables["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "buffers": variables.get("buffers", {}),
                "opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(cfg.seed))}
    sh = state_shardings(cfg, tx, mesh)
    if variables is None:
        variables = init_variables(cfg.model, cfg.seed, cfg.runtime,
                                   shardings={"params": sh["params"], "buffers": sh["buffers"]})
    else:
        variables = jax.device_put({"params": variables["params"], "buffers": variables.get("buffers", {})},
                                   {"params": sh["params"], "buffers": sh["buffers"]})
    opt_state = jax.jit(tx.init, out_shardings=sh["opt_state"])(variables["params"])
    rng = jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), sh["rng"])
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"]), "params": variables["params"],
            "buffers": variables["buffers"], "opt_state": opt_state, "rng": rng}


def abstract_state(cfg: TrainConfig, tx: optax.GradientTransformation) -> State:
    """The train state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves; nothing allocated)."""
    v = abstract_variables(cfg.model)
    return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": v["params"], "buffers": v.get("buffers", {}),
            "opt_state": jax.eval_shape(tx.init, v["params"]),
            "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}


def state_shardings(cfg: TrainConfig, tx: optax.GradientTransformation, mesh) -> State:
    """``NamedSharding`` of every train-state leaf on ``mesh`` (``v4jax.parallel.mesh``)."""
    return _shardings(cfg.model, mesh, abstract_state(cfg, tx))


def _forward_losses(cfg: TrainConfig, stage, params, buffers, batch, step):
    """Total loss of ``stage`` (a name or a traced id) and its parts. One graph for all stages:
    CSA attention is dense in stages 0-1 (``dense_attention`` flag, no recompile), the indexer KL
    is always computed (indexer inputs detached) and weighted by stage."""
    sid = _as_id(stage)
    mc = cfg.model
    model = Transformer(mc, cfg.runtime)
    tokens, seg = batch["tokens"], batch["segment_ids"]
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    with_mtp = mc.n_mtp_layers > 0
    has_csa = "csa" in mc.layer_types
    ctx = SeqContext(segment_ids=seg[:, :-1], dense_attention=sid < 2, indexer_loss=has_csa)
    out = model.apply({"params": params, "buffers": buffers}, ids, ctx, with_mtp=with_mtp, next_ids=targets)
    main_mask, mtp_mask = target_masks(seg)
    ce_sum, n_tok = masked_cross_entropy(out["logits"], targets, main_mask)
    lm = ce_sum / jnp.maximum(n_tok, 1.0)
    aux = {"lm_loss": lm, "tokens": n_tok}
    hash_flags = [mc.is_hash_layer(i) for i in range(mc.n_layers)]
    stats = list(out["moe"])
    bal = balance_loss(stats, hash_flags)
    model_loss = lm
    if with_mtp:
        mtp_targets = jnp.concatenate([tokens[:, 2:], jnp.zeros_like(tokens[:, :1])], axis=1)
        mtp_sum, mtp_n = masked_cross_entropy(out["mtp_logits"], mtp_targets, mtp_mask)
        mtp = mtp_sum / jnp.maximum(mtp_n, 1.0)
        w = jnp.where(step >= cfg.optim.decay_start, cfg.mtp_weight_after_decay, cfg.mtp_weight)
        model_loss = model_loss + w * mtp
        bal = bal + balance_loss([out["mtp_moe"]], [False])
        aux["mtp_loss"] = mtp
    model_loss = model_loss + cfg.balance_weight * bal
    aux["balance"] = bal
    if has_csa:
        kl = cfg.indexer_loss_weight * indexer_loss(out["indexer"], mc.layer_types)
        aux["indexer_kl"] = kl
        total = jnp.where(sid == 1, kl, model_loss + jnp.where(sid == 2, kl, 0.0))
    else:
        total = model_loss
    return total, (aux, stats, out.get("mtp_moe"))


def make_train_step(cfg: TrainConfig, tx: optax.GradientTransformation, stage: str | None = None,
                    lr_fn: Callable | None = None, jit: bool = True, mesh=None):
    """``train_step(state, batch) -> (state, metrics)``. The curriculum stage follows
    ``state["step"]`` (one compiled function for the whole run) unless ``stage`` pins one.
    ``mesh``: compiled for that mesh (state in ``state_shardings``, batch split over the batch
    axes, metrics replicated), traced and run under ``mesh_context``."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")

    skip_spikes = cfg.spike_action == "skip" and cfg.spike_factor is not None

    def train_step(state: State, batch: dict, loss_limit=None) -> tuple[State, dict]:
        step = state["step"]
        if loss_limit is None:
            loss_limit = jnp.float32(jnp.inf)
        sid = stage_id(cfg, step) if stage is None else _as_id(stage)
        grad_fn = jax.value_and_grad(_forward_losses, argnums=2, has_aux=True)
        (loss, (aux, stats, mtp_stats)), grads = grad_fn(cfg, sid, state["params"], state["buffers"], batch, step)
        grads = _mask_by_path(grads, jax.tree.map(jnp.zeros_like, grads), sid)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        spike = finite & (aux["lm_loss"] > loss_limit)
        applied = finite & ~spike if skip_spikes else finite

        def apply(grads):
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = _mask_by_path(optax.apply_updates(state["params"], updates), state["params"], sid)
            opt_state = _mask_by_path(opt_state, state["opt_state"], sid)
            buffers = state["buffers"]
            if cfg.bias_update_speed > 0:
                moved = updated_router_biases(buffers, stats, mtp_stats, cfg.bias_update_speed, cfg.model)
                buffers = moved if isinstance(sid, int) and sid != 1 else jax.tree.map(
                    lambda n, o: jnp.where(sid != 1, n, o), moved, buffers)
            return params, opt_state, buffers

        def keep(grads):
            return state["params"], state["opt_state"], state["buffers"]

        # a conditional, not a select over the whole state: only the taken branch runs, and the
        # update writes straight into the (donated) state buffers
        params, opt_state, buffers = jax.lax.cond(applied, apply, keep, grads)
        new_state = {"step": step + 1, "params": params, "opt_state": opt_state, "buffers": buffers,
                     "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": gnorm, "skipped": (~applied).astype(jnp.int32),
                   "nonfinite": (~finite).astype(jnp.int32), "spike": spike.astype(jnp.int32), "stage": jnp.asarray(sid, jnp.int32), **aux}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(step)
        metrics["moe_dropped"] = sum(jnp.sum(st["dropped"]) for st in stats) + (
            0 if mtp_stats is None else jnp.sum(mtp_stats["dropped"]))
        loads = [st["load"] for i, st in enumerate(stats) if not cfg.model.is_hash_layer(i)]
        if loads:   # max/mean expert load of the learned-routing layers (1 = perfectly balanced)
            ld = jnp.stack(loads).astype(jnp.float32)
            metrics["max_load"] = jnp.mean(jnp.max(ld, -1) / jnp.maximum(jnp.mean(ld, -1), 1e-9))
        return new_state, metrics

    if not jit:
        return train_step

    if mesh is None:
        jitted = jax.jit(train_step, donate_argnums=(0,))
    else:
        sh = state_shardings(cfg, tx, mesh)
        bsh = batch_sharding(mesh, cfg.batch_size)
        jitted = jax.jit(train_step, donate_argnums=(0,),
                         in_shardings=(sh, {"tokens": bsh, "segment_ids": bsh}, replicated(mesh)),
                         out_shardings=(sh, replicated(mesh)))

    def _limit(loss_limit):
        return jnp.float32(jnp.inf) if loss_limit is None else loss_limit

    def run(state: State, batch: dict, loss_limit=None):
        """``loss_limit``: the spike limit on the LM loss (an fp32 scalar; default: none)."""
        if mesh is None:
            return jitted(state, batch, _limit(loss_limit))
        with mesh_context(mesh):
            return jitted(state, batch, _limit(loss_limit))

    def lower(state, batch, loss_limit=None):
        """``jax.jit(...).lower`` of the step (under the mesh when there is one)."""
        if mesh is None:
            return jitted.lower(state, batch, _limit(loss_limit))
        with mesh_context(mesh):
            return jitted.lower(state, batch, _limit(loss_limit))

    run.lower, run.jitted = lower, jitted
    return run




def make_eval_step(cfg: TrainConfig, jit: bool = True, mesh=None):
    """``eval_step(params, buffers, batch, stage_id) -> sums`` (``lm_sum``, ``tokens``,
    ``mtp_sum``, ``mtp_tokens``) so that evaluation over many batches averages per token; the
    stage (traced) picks the attention: dense CSA before the sparse stage. ``mesh``: run there
    (parameters and batch as they come, sharded or not)."""

    def eval_step(params, buffers, batch, sid):
        model = Transformer(cfg.model, cfg.runtime)
        tokens, seg = batch["tokens"], batch["segment_ids"]
        ids, targets = tokens[:, :-1], tokens[:, 1:]
        with_mtp = cfg.model.n_mtp_layers > 0
        ctx = SeqContext(segment_ids=seg[:, :-1], dense_attention=_as_id(sid) < 2)
        out = model.apply({"params": params, "buffers": buffers}, ids, ctx, with_mtp=with_mtp, next_ids=targets)
        main_mask, mtp_mask = target_masks(seg)
        lm_sum, n = masked_cross_entropy(out["logits"], targets, main_mask)
        res = {"lm_sum": lm_sum, "tokens": n}
        if with_mtp:
            mtp_targets = jnp.concatenate([tokens[:, 2:], jnp.zeros_like(tokens[:, :1])], axis=1)
            res["mtp_sum"], res["mtp_tokens"] = masked_cross_entropy(out["mtp_logits"], mtp_targets, mtp_mask)
        return res

    if not jit:
        return eval_step

    return jax.jit(eval_step) if mesh is None else under_mesh(jax.jit(eval_step), mesh)


@jax.jit
def _all_finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree) -> bool:
    """True when every floating leaf of ``tree`` is finite (checked before any checkpoint write and
    after a restore): one compiled reduction over the whole tree and one device-to-host read
    (compiled once per tree structure, not once per leaf shape)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True
