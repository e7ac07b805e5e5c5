"""The pure, jitted training and evaluation steps.

``state`` is a plain pytree ``{"step", "params", "buffers", "opt_state", "rng"}`` (``buffers``: the
router biases and hash tables, outside the gradient); ``train_step(state, batch) -> (state,
metrics)`` is jitted once per curriculum stage (see ``v4jax.train.config``).

A step whose loss or gradient is not finite applies nothing (parameters, optimizer state and
biases stay as they were; the step counter advances) and reports ``skipped = 1``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from v4jax.model.transformer import Transformer
from v4jax.train.config import STAGES, TrainConfig
from v4jax.train.losses import (balance_loss, indexer_loss, masked_cross_entropy, target_masks,
                                updated_router_biases)

State = dict[str, Any]


def _is_indexer(path) -> bool:
    return any(getattr(k, "key", None) == "indexer" for k in path)


def trainable(stage: str) -> Callable[[tuple], bool]:
    """Which parameters a stage updates, by path: dense -> all but the indexer (it is unused),
    indexer_warmup -> only the indexer, sparse -> all."""
    if stage == "dense":
        return lambda path: not _is_indexer(path)
    if stage == "indexer_warmup":
        return _is_indexer
    return lambda path: True


def _keep_frozen(new, old, train_fn):
    """Per leaf: the new value where the leaf's path is trainable (or it is a scalar counter),
    the old one otherwise. Works on parameters and on optimizer states that mirror them."""
    return jax.tree_util.tree_map_with_path(
        lambda p, n, o: n if (jnp.ndim(n) == 0 or train_fn(p)) else o, new, old)


def init_state(cfg: TrainConfig, tx: optax.GradientTransformation, variables: dict | None = None) -> State:
    """Fresh state: model variables (``V4Model.init`` with ``cfg.seed``) and optimizer state."""
    if variables is None:
        from v4jax.api import V4Model

        variables = V4Model.init(cfg.model, seed=cfg.seed).variables
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "buffers": variables.get("buffers", {}),
            "opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(cfg.seed))}


def _forward_losses(cfg: TrainConfig, stage: str, params, buffers, batch, step):
    model = Transformer(cfg.model_for(stage))
    mc = cfg.model
    tokens, seg = batch["tokens"], batch["segment_ids"]
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    with_mtp = mc.n_mtp_layers > 0
    want_kl = stage in ("indexer_warmup", "sparse") and "csa" in mc.layer_types
    out = model.apply({"params": params, "buffers": buffers}, ids, with_mtp=with_mtp,
                      segment_ids=seg[:, :-1], next_ids=targets, indexer_loss=want_kl)
    main_mask, mtp_mask = target_masks(seg)
    ce_sum, n_tok = masked_cross_entropy(out["logits"], targets, main_mask)
    lm = ce_sum / jnp.maximum(n_tok, 1.0)
    aux = {"lm_loss": lm, "tokens": n_tok}
    hash_flags = [mc.is_hash_layer(i) for i in range(mc.n_layers)]
    stats = list(out["moe"])
    bal = balance_loss(stats, hash_flags)
    total = lm
    if with_mtp:
        mtp_targets = jnp.concatenate([tokens[:, 2:], jnp.zeros_like(tokens[:, :1])], axis=1)
        mtp_sum, mtp_n = masked_cross_entropy(out["mtp_logits"], mtp_targets, mtp_mask)
        mtp = mtp_sum / jnp.maximum(mtp_n, 1.0)
        w = jnp.where(step >= cfg.optim.decay_start, cfg.mtp_weight_after_decay, cfg.mtp_weight)
        total = total + w * mtp
        bal = bal + balance_loss([out["mtp_moe"]], [False])
        aux["mtp_loss"] = mtp
    total = total + cfg.balance_weight * bal
    aux["balance"] = bal
    if want_kl:
        kl = indexer_loss(stats)
        aux["indexer_kl"] = kl
        total = cfg.indexer_loss_weight * kl if stage == "indexer_warmup" else total + cfg.indexer_loss_weight * kl
    return total, (aux, stats, out.get("mtp_moe"))


def make_train_step(cfg: TrainConfig, tx: optax.GradientTransformation, stage: str,
                    lr_fn: Callable | None = None, jit: bool = True):
    """``train_step(state, batch) -> (state, metrics)`` for one curriculum stage."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    train_fn = trainable(stage)

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        step = state["step"]
        grad_fn = jax.value_and_grad(_forward_losses, argnums=2, has_aux=True)
        (loss, (aux, stats, mtp_stats)), grads = grad_fn(cfg, stage, state["params"], state["buffers"], batch, step)
        grads = _keep_frozen(grads, jax.tree.map(jnp.zeros_like, grads), train_fn)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        # keep the optimizer's arithmetic finite on a bad step; its result is discarded below
        safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, opt_state = tx.update(safe_grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = _keep_frozen(params, state["params"], train_fn)
        opt_state = _keep_frozen(opt_state, state["opt_state"], train_fn)
        buffers = state["buffers"]
        if stage != "indexer_warmup" and cfg.bias_update_speed > 0:
            buffers = updated_router_biases(buffers, stats, mtp_stats, cfg.bias_update_speed)
        pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"step": step + 1, "params": pick(params, state["params"]),
                     "opt_state": pick(opt_state, state["opt_state"]), "buffers": pick(buffers, state["buffers"]),
                     "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": gnorm, "skipped": (~finite).astype(jnp.int32), **aux}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(step)
        loads = [st["load"] for i, st in enumerate(stats) if not cfg.model.is_hash_layer(i)]
        if loads:   # max/mean expert load of the learned-routing layers (1 = perfectly balanced)
            ld = jnp.stack(loads).astype(jnp.float32)
            metrics["max_load"] = jnp.mean(jnp.max(ld, -1) / jnp.maximum(jnp.mean(ld, -1), 1e-9))
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,)) if jit else train_step


def make_eval_step(cfg: TrainConfig, stage: str, jit: bool = True):
    """``eval_step(params, buffers, batch) -> sums`` (``lm_sum``, ``tokens``, ``mtp_sum``,
    ``mtp_tokens``) so that evaluation over many batches averages per token."""

    def eval_step(params, buffers, batch):
        model = Transformer(cfg.model_for(stage))
        tokens, seg = batch["tokens"], batch["segment_ids"]
        ids, targets = tokens[:, :-1], tokens[:, 1:]
        with_mtp = cfg.model.n_mtp_layers > 0
        out = model.apply({"params": params, "buffers": buffers}, ids, with_mtp=with_mtp,
                          segment_ids=seg[:, :-1], next_ids=targets)
        main_mask, mtp_mask = target_masks(seg)
        lm_sum, n = masked_cross_entropy(out["logits"], targets, main_mask)
        res = {"lm_sum": lm_sum, "tokens": n}
        if with_mtp:
            mtp_targets = jnp.concatenate([tokens[:, 2:], jnp.zeros_like(tokens[:, :1])], axis=1)
            res["mtp_sum"], res["mtp_tokens"] = masked_cross_entropy(out["mtp_logits"], mtp_targets, mtp_mask)
        return res

    return jax.jit(eval_step) if jit else eval_step


def all_finite(tree) -> bool:
    """True when every floating leaf of ``tree`` is finite (checked before any checkpoint write)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return bool(all(bool(jnp.all(jnp.isfinite(x))) for x in leaves))
