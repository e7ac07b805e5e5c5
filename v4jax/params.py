"""Parameter counts from shapes only (``jax.eval_shape``; nothing is allocated). Spec 1.3."""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from v4jax.config import V4Config
from v4jax.model.layout import unstack_layers
from v4jax.model.transformer import Transformer


def abstract_variables(cfg: V4Config, boxed: bool = False):
    """The model's variables as ``jax.ShapeDtypeStruct`` leaves (``LogicallyPartitioned`` boxes
    kept when ``boxed``)."""
    ids = jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), ids)
    return shapes if boxed else nn.meta.unbox(shapes)


@dataclass(frozen=True)
class ParamCount:
    total: int            # every trainable parameter, MTP excluded
    total_with_mtp: int
    routed_experts: int   # routed-expert parameters of the main layers
    embedding: int
    active: int           # per token, input embedding excluded (spec 1.3 convention)
    active_with_embedding: int

    def __str__(self) -> str:
        def b(n: int) -> str:
            for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
                if n >= div:
                    return f"{n / div:.2f}{unit}"
            return str(n)

        return (f"total {b(self.total)} (with MTP {b(self.total_with_mtp)}), active/token "
                f"{b(self.active)} (with embedding {b(self.active_with_embedding)})")


def count_params(cfg: V4Config) -> ParamCount:
    params = unstack_layers(cfg, abstract_variables(cfg)["params"])
    size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
    mtp = size({k: v for k, v in params.items() if k.startswith("mtp_")})
    total = size(params) - mtp
    routed = sum(size(params[f"layers_{i}"]["ffn"]["experts"]) for i in range(cfg.n_layers))
    emb = size(params["embed"])
    active = total - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts
    return ParamCount(total=total, total_with_mtp=total + mtp, routed_experts=routed, embedding=emb,
                      active=active - emb, active_with_embedding=active)
