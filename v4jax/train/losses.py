"""Training losses (spec 9, techniques 3 and 5): next-token and MTP cross-entropy over packed
documents, the sequence-wise balance loss, the indexer KL, and the aux-loss-free bias update.

Batches are packed rows ``tokens [B, T+1]`` with ``segment_ids [B, T+1]`` (document number within
the row, 0 = padding). Position t is trained to predict t+1 (main head) and t+2 (MTP head) only when
the target lies in the same document as t and t is not padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from v4jax.model.layout import is_stacked, stack_layers, unstack_layers


def target_masks(segment_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``segment_ids [B, T+1]`` -> (next-token mask ``[B, T]``, MTP mask ``[B, T]``; the MTP mask's
    last column is False: position T-1 has no t+2 target in the row)."""
    seg = segment_ids
    inp = seg[:, :-1]
    main = (seg[:, 1:] == inp) & (inp > 0)
    mtp = (seg[:, 2:] == seg[:, :-2]) & (seg[:, :-2] > 0)
    mtp = jnp.concatenate([mtp, jnp.zeros_like(mtp[:, :1])], axis=1)
    return main, mtp


def masked_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray):
    """Sum of token cross-entropies over ``mask`` and the number of counted tokens (fp32)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m), jnp.sum(m)


def balance_loss(moe_stats: list[dict], hash_routed: list[bool]) -> jnp.ndarray:
    """Sequence-wise balance loss summed over the learned-routing MoE layers (hash-routed layers
    choose experts by token id and are left out): ``sum_layers mean_seq sum_e f_e P_e``."""
    terms = [st["balance"] for st, h in zip(moe_stats, hash_routed, strict=True) if not h]
    return jnp.sum(jnp.stack(terms)) if terms else jnp.zeros((), jnp.float32)


def indexer_loss(indexer_stats: list, layer_types) -> jnp.ndarray:
    """Mean per-query indexer KL (``IndexerStats.kl / count`` of each layer), summed over the CSA
    layers (``layer_types[i] == "csa"``)."""
    terms = [st.kl / jnp.maximum(st.count, 1.0) for st, t in zip(indexer_stats, layer_types, strict=True)
             if t == "csa"]
    return jnp.sum(jnp.stack(terms)) if terms else jnp.zeros((), jnp.float32)


def updated_router_biases(buffers: dict, moe_stats: list[dict], mtp_stats: dict | None, speed: float,
                          cfg=None) -> dict:
    """Aux-loss-free balancing (techniques 5.1), outside the gradient:
    ``b_e <- b_e + speed * sign(mean(load) - load_e)`` for every learned-routing layer, with the
    loads of the whole batch. Returns new buffers (hash tables untouched). ``buffers`` in the
    model's stacked layout need ``cfg`` (``V4Config``) to find each layer."""
    if is_stacked(buffers):
        if cfg is None:
            raise ValueError("updated_router_biases: stacked buffers need cfg to locate each layer")
        return stack_layers(cfg, updated_router_biases(unstack_layers(cfg, buffers), moe_stats, mtp_stats, speed))
    new = jax.tree.map(lambda x: x, buffers)

    def bump(scope: dict, st: dict):
        if "gate" not in scope.get("ffn", {}) or "bias" not in scope["ffn"]["gate"]:
            return
        load = st["load"].astype(jnp.float32)
        b = scope["ffn"]["gate"]["bias"]
        scope["ffn"]["gate"]["bias"] = (b + speed * jnp.sign(jnp.mean(load) - load)).astype(b.dtype)

    for i, st in enumerate(moe_stats):
        if f"layers_{i}" in new:
            bump(new[f"layers_{i}"], st)
    if mtp_stats is not None and "mtp_0" in new:
        bump(new["mtp_0"], mtp_stats)
    return new
