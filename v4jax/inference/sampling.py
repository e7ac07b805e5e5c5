"""Next-token choice from logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def choose_next(logits: jnp.ndarray, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0) -> jnp.ndarray:
    """logits ``[B, V]`` -> token ids ``[B]``. ``temperature == 0`` is greedy (lowest id on ties).
    Traceable (the decode step fuses it); ``sample_next`` is the jitted form."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # keeps at least the top token
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


sample_next = partial(jax.jit, static_argnames=("temperature", "top_p"))(choose_next)
