"""Device meshes from a text spec, the mesh context, and the batch's placement.

    mesh = make_mesh("data=2,fsdp=2,expert=2")        # product must equal jax.device_count()
    with mesh_context(mesh):                          # jax.set_mesh + v4jax.sharding.active_mesh
        ...

Axis names are ``v4jax.sharding.MESH_AXES`` (``data``, ``fsdp``, ``expert``, ``tensor``); the mesh
is built in that order whatever order the spec gives (``tensor`` innermost), with
``jax.make_mesh`` (which orders devices for the physical topology) and Auto axes, so that XLA's
sharding propagation (GSPMD) places everything the rules table leaves open.

A batch ``[B, ...]`` is split over ``BATCH_AXES``. The shardings of parameters, train states and
caches (which need the model's abstract variables) are in ``v4jax.parallel.placement``; this module
knows nothing of the model.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from v4jax.config import ConfigError
from v4jax.sharding import _ACTIVE, MESH_AXES, axis_size, batch_axes, batch_shards, rules_for, to_mesh_spec


def parse_mesh(spec) -> dict[str, int]:
    """``"data=2,fsdp=2,expert=2"`` (or a dict) -> ``{"data": 2, "fsdp": 2, "expert": 2}``.
    Raises ``ConfigError`` naming the bad part."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        text = str(spec).strip()
        if not text:
            raise ConfigError("mesh spec is empty: expected axis=size pairs such as 'data=2,fsdp=4'")
        items = []
        for part in text.split(","):
            name, eq, size = part.strip().partition("=")
            if not eq or not name.strip() or not size.strip():
                raise ConfigError(f"mesh spec {text!r}: {part.strip()!r} is not axis=size")
            items.append((name.strip(), size.strip()))
    out: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ConfigError(f"mesh axis {name!r} is not one of {MESH_AXES}")
        if name in out:
            raise ConfigError(f"mesh axis {name!r} is given twice")
        if isinstance(size, bool) or not (isinstance(size, int) or str(size).isdigit()) or int(size) < 1:
            raise ConfigError(f"mesh axis {name}={size!r}: the size must be a positive integer")
        n = int(size)
        out[name] = n
    return out


def format_mesh(axes: dict[str, int]) -> str:
    return ",".join(f"{a}={axes[a]}" for a in MESH_AXES if a in axes)


def make_mesh(spec, devices=None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all of ``jax.devices()``, every process's) with the
    axes of ``spec`` (``parse_mesh``) in ``MESH_AXES`` order. The sizes must multiply to the
    number of devices."""
    axes = parse_mesh(spec)
    devices = jax.devices() if devices is None else list(devices)
    total = math.prod(axes.values())
    if total != len(devices):
        raise ConfigError(f"mesh {format_mesh(axes)} has {total} devices but {len(devices)} are present "
                          f"({devices[0].platform if devices else 'none'}); the sizes must multiply to the "
                          f"device count" + ("; on CPU, simulate N devices with XLA_FLAGS=--xla_force_host_platform_device_count=N"
                                             if devices and devices[0].platform == "cpu" else ""))
    names = tuple(a for a in MESH_AXES if a in axes)
    shape = tuple(axes[a] for a in names)
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    if devices == jax.devices():
        return jax.make_mesh(shape, names, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=auto)


@contextlib.contextmanager
def mesh_context(mesh: Mesh | None):
    """Run (and trace) under ``mesh``: ``jax.set_mesh`` plus the mesh that ``v4jax.sharding.constrain``
    and the expert-parallel MoE read. ``None``: no mesh (one device), nothing changes."""
    if mesh is None:
        yield None
        return
    token = _ACTIVE.set(mesh)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def under_mesh(fn, mesh: Mesh | None):
    """``fn`` (a jitted function) traced and called under ``mesh_context(mesh)``: the
    expert-parallel MoE and the activation constraints read the mesh at trace time."""
    if mesh is None:
        return fn

    def run(*args, **kw):
        with mesh_context(mesh):
            return fn(*args, **kw)

    run.jitted = fn
    return run


def batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
    """Rows ``[B, ...]`` split over the batch axes; ``batch_size`` is checked to divide evenly."""
    n = batch_shards(mesh)
    if batch_size is not None and batch_size % n:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the {n} batch shards of mesh "
                          f"{dict(mesh.shape)} (axes {batch_axes(mesh)})")
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of a global batch that this process's devices hold (one contiguous
    range: ``make_mesh`` puts each process's devices together and the batch axes outermost)."""
    sh = batch_sharding(mesh, batch_size)
    spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                    for s in sh.addressable_devices_indices_map((batch_size,)).values()})
    lo, hi = spans[0][0], max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    if covered != hi - lo:
        raise ConfigError(f"this process's devices hold rows {spans} of the batch, not one contiguous range; "
                          f"put the batch axes outermost in the mesh")
    return lo, hi


def put_batch(batch: dict, mesh: Mesh | None, global_rows: int | None = None) -> dict:
    """Host batch (numpy, this process's rows) -> device arrays split over the batch axes. One
    process: ``device_put``; several: each process passes its own rows
    (``jax.make_array_from_process_local_data``)."""
    if mesh is None:
        return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    sh = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v, np.int32), sh) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        v = np.asarray(v, np.int32)
        shape = None if global_rows is None else (global_rows,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sh, v, shape)
    return out


def host_batch_size(mesh: Mesh | None, batch_size: int) -> int:
    """Rows of the global batch this process feeds."""
    if mesh is None or jax.process_count() == 1:
        return batch_size
    lo, hi = process_rows(mesh, batch_size)
    return hi - lo


def describe(mesh: Mesh | None) -> str:
    if mesh is None:
        return "1 device (no mesh)"
    d = mesh.devices.flat[0]
    return f"mesh {format_mesh(dict(mesh.shape))} over {mesh.size} {d.platform} devices ({jax.process_count()} process(es))"


__all__ = ["parse_mesh", "format_mesh", "make_mesh", "mesh_context", "under_mesh", "axis_size", "batch_axes",
           "batch_shards", "batch_sharding", "replicated", "process_rows", "put_batch", "host_batch_size", "describe",
           "rules_for", "to_mesh_spec"]
