"""Running on many devices: meshes (``mesh``), where parameters, states and caches live on them
(``placement``), multi-host start-up (``distributed``) and the memory planner (``plan``). The
expert-parallel MoE dispatch is ``v4jax.moe.expert_parallel``; the rules table is
``v4jax.sharding``."""

from v4jax.parallel.mesh import batch_sharding, describe, make_mesh, mesh_context, parse_mesh, put_batch
from v4jax.parallel.placement import state_shardings, variables_shardings

__all__ = ["batch_sharding", "describe", "make_mesh", "mesh_context", "parse_mesh", "put_batch",
           "state_shardings", "variables_shardings"]
