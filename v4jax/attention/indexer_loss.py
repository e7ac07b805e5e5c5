"""Training signal of the lightning indexer (techniques 3.1, 3.4 "[ours] indexer loss for CSA").

Target: the main attention's probability mass on each compressed entry, summed over heads, with the
window keys and the sink left out, L1-normalised over the entry set S_t the layer attended to
(all visible entries in the dense warm-up, the selected top-k in the sparse stage):

    p_t = normalise_S( sum_h softmax_row(q_h . C_i * scale)[i] ),   i in S_t
    L_I = mean_t KL( p_t || softmax_S(I_t) )

The target carries no gradient, and the caller feeds the indexer detached inputs, so ``L_I``
trains only the indexer and the language-model loss never reaches it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mass(q: jnp.ndarray, comp: jnp.ndarray, lse: jnp.ndarray, entry_set: jnp.ndarray,
                   scale: float) -> jnp.ndarray:
    """q ``[B, T, H, c]``, comp ``[B, N, c]``, lse ``[B, T, H]`` (log softmax denominators of the
    layer), entry_set ``[B, T, N]`` bool -> mass ``[B, T, N]`` (fp32, no gradient)."""
    logits = jnp.einsum("bthc,bnc->bthn", q.astype(jnp.float32), comp.astype(jnp.float32)) * scale
    p = jnp.exp(logits - lse[..., None])
    mass = jnp.where(entry_set, jnp.sum(p, axis=2), 0.0)
    return jax.lax.stop_gradient(mass)


def indexer_kl(mass: jnp.ndarray, scores: jnp.ndarray, entry_set: jnp.ndarray,
               query_mask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """KL(normalised mass || softmax of the indexer scores over the entry set), per query.

    mass, scores ``[B, T, N]``, entry_set ``[B, T, N]`` bool, query_mask ``[B, T]`` bool (e.g. not
    padding). Returns (sum of KL over counted queries, number of counted queries); a query counts
    when its set is non-empty and it carries attention mass."""
    total = jnp.sum(mass, axis=-1, keepdims=True)
    counted = (total[..., 0] > 0) & jnp.any(entry_set, axis=-1)
    if query_mask is not None:
        counted = counted & query_mask
    target = mass / jnp.where(total > 0, total, 1.0)
    logq = jax.nn.log_softmax(jnp.where(entry_set, scores, -jnp.inf), axis=-1)
    terms = jnp.where(entry_set & (target > 0), target * (jnp.log(jnp.where(target > 0, target, 1.0))
                                                             - jnp.where(entry_set, logq, 0.0)), 0.0)
    kl = jnp.sum(terms, axis=-1)
    return jnp.sum(jnp.where(counted, kl, 0.0)), jnp.sum(counted).astype(jnp.float32)
