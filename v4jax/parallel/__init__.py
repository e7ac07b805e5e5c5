"""Running on many devices: meshes and shardings (``mesh``), expert-parallel MoE dispatch
(``expert``), multi-host start-up (``distributed``) and the memory planner (``plan``)."""

from v4jax.parallel.mesh import (batch_sharding, describe, make_mesh, mesh_context, parse_mesh, put_batch,
                                 state_shardings, variables_shardings)

__all__ = ["batch_sharding", "describe", "make_mesh", "mesh_context", "parse_mesh", "put_batch",
           "state_shardings", "variables_shardings"]
