"""Multi-host start-up: ``initialize()`` joins this process to a JAX distributed system
(``jax.distributed.initialize``) before anything touches a JAX backend.

After it, ``jax.devices()`` lists every process's devices, ``v4jax.parallel.mesh.make_mesh`` builds
one global mesh over them, each process feeds only its rows of the batch
(``v4jax.parallel.mesh.process_rows`` / ``put_batch``) and orbax checkpoints are written by all
processes together into one shared directory.

Where the settings come from, first match wins:

1. explicit arguments (``v4jax-train --coordinator HOST:PORT --num-processes N --process-id I``);
2. the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
   (and ``JAX_LOCAL_DEVICE_IDS``, read by JAX itself);
3. a cluster that JAX detects by itself (then every argument may be left out): SLURM (``srun``:
   ``SLURM_JOB_ID`` ... with ``SLURM_NTASKS`` > 1), Open MPI (``mpirun``: ``OMPI_COMM_WORLD_SIZE`` > 1),
   Cloud TPU with several hosts (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` naming more than
   one host, or multislice ``MEGASCALE_*``). A TPU VM pod created with ``gcloud`` may only describe
   its hosts in the GCE metadata server: pass ``auto=True`` (``v4jax-train --distributed``, or
   ``V4JAX_DISTRIBUTED=1``) to call ``jax.distributed.initialize()`` and let JAX ask it.

Nothing found: one process, nothing is done. On CPU the cross-process collectives use gloo
(``jax_cpu_collectives_implementation``), which is what makes the loopback tests work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from v4jax.config import ConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_FORCE = "V4JAX_DISTRIBUTED"


def _as_int(value, what: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, not {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an integer, not {value!r}") from None


def _check_coordinator(addr: str) -> str:
    addr = str(addr).strip()
    host, colon, port = addr.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"coordinator {addr!r} is not HOST:PORT (e.g. 10.0.0.1:1234; process 0's address "
                          f"and a free port on it)")
    return addr


def _device_ids(ids) -> list[int] | None:
    if ids is None:
        return None
    if isinstance(ids, str):
        parts = [p.strip() for p in ids.split(",") if p.strip()]
    elif isinstance(ids, int):
        parts = [ids]
    else:
        parts = list(ids)
    out = [_as_int(p, "local_device_ids") for p in parts]
    if not out or any(i < 0 for i in out):
        raise ConfigError(f"local_device_ids {ids!r}: expected non-negative device numbers such as 0,1,2,3")
    return out


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process launcher JAX can read its settings from, if any: ``"slurm"``, ``"ompi"``,
    ``"tpu"``; ``None`` for a single process (including a one-task SLURM job or a one-host TPU VM)."""
    env = os.environ if environ is None else environ

    def more_than_one(key) -> bool:
        try:
            return int(env.get(key, "1")) > 1
        except ValueError:
            return False

    # jax's SlurmCluster needs all of these (set inside an ``srun`` step)
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")) and more_than_one("SLURM_NTASKS"):
        return "slurm"
    if more_than_one("OMPI_COMM_WORLD_SIZE") and all(
            k in env for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")):
        return "ompi"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("TPU_PROCESS_ADDRESSES_PATH") \
            or more_than_one("MEGASCALE_NUM_SLICES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def is_initialized() -> bool:
    import jax

    return bool(jax.distributed.is_initialized())


def _state():
    from jax._src import distributed as _d

    return _d.global_state


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | str | int | None = None, *, auto: bool | None = None,
               environ: Mapping[str, str] | None = None, initialization_timeout: int = 300) -> bool:
    """Join the JAX distributed system, once, before any JAX computation; returns ``True`` when this
    process is (now, or already was) one of several, ``False`` for a lone process (nothing done).

    ``coordinator`` ``"HOST:PORT"`` is process 0's address (every process passes the same one);
    ``num_processes`` and ``process_id`` (``0 <= process_id < num_processes``) complete it. Missing
    arguments come from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``,
    then from a detected SLURM / Open MPI / Cloud TPU launcher (``detect_cluster``); ``auto=True``
    (or ``V4JAX_DISTRIBUTED=1``) calls ``jax.distributed.initialize()`` anyway and lets JAX detect.
    ``local_device_ids`` restricts this process to some local accelerators (JAX's default under
    SLURM/Open MPI on GPUs is one GPU per process: with one task per node pass all of them).

    Raises ``ConfigError`` for settings that cannot work (process_id out of range, no coordinator,
    a malformed address) or when a JAX backend is already running; calling it again with the
    same settings (or none) is a no-op.
    """
    import jax

    env = os.environ if environ is None else environ
    coord = coordinator if coordinator not in (None, "") else env.get(ENV_COORDINATOR) or None
    n = _as_int(num_processes, "num_processes")
    if n is None:
        n = _as_int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    pid = _as_int(process_id, "process_id")
    if pid is None:
        pid = _as_int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    ids = _device_ids(local_device_ids)
    if auto is None:
        auto = env.get(ENV_FORCE, "").strip().lower() in ("1", "true", "yes", "on", "auto")
    if coord is not None:
        coord = _check_coordinator(coord)
    if n is not None and n < 1:
        raise ConfigError(f"num_processes must be >= 1, not {n}")
    if pid is not None and pid < 0:
        raise ConfigError(f"process_id must be >= 0, not {pid}")
    if n is not None and pid is not None and pid >= n:
        raise ConfigError(f"process_id {pid} is out of range for {n} process(es): the ids are 0 .. {n - 1}")

    if is_initialized():                       # idempotent; but refuse contradicting settings
        st = _state()
        for name, want, have in (("num_processes", n, st.num_processes), ("process_id", pid, st.process_id),
                                 ("coordinator", coord, st.coordinator_address)):
            if want is not None and want != have:
                raise ConfigError(f"jax.distributed is already initialised with {name}={have!r}, not {want!r}")
        return True

    cluster = detect_cluster(env)
    explicit = any(v is not None for v in (coord, n, pid))
    if explicit and cluster is None and not auto:
        if n == 1 and pid in (None, 0):
            return False                       # a lone process, said explicitly
        missing = [flag for flag, v in (("--coordinator HOST:PORT", coord), ("--num-processes N", n),
                                        ("--process-id I", pid)) if v is None]
        if missing:
            raise ConfigError(f"multi-process start-up needs {', '.join(missing)} too (or the environment "
                              f"variables {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
                              f"coordinator={coord!r}, num_processes={n!r}, process_id={pid!r}")
    elif not explicit and cluster is None and not auto:
        return False                           # one process: nothing to do

    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ConfigError("v4jax.parallel.distributed.initialize() must run before any JAX computation (a JAX "
                          "backend is already up: something called jax.devices(), device_put or a jitted "
                          "function first); call it first thing in the program")
    if jax.config.jax_cpu_collectives_implementation is None:   # cross-process collectives on CPU
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid,
                                   local_device_ids=ids, initialization_timeout=initialization_timeout)
    except ValueError as e:           # what JAX could not work out (e.g. no coordinator in this environment)
        raise ConfigError(f"jax.distributed.initialize (cluster detected: {cluster or 'none'}): {e}; pass "
                          f"--coordinator/--num-processes/--process-id") from None
    return True


def process_info() -> dict:
    """``{"process_index", "process_count", "local_devices", "devices"}`` of this process."""
    import jax

    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}


__all__ = ["initialize", "detect_cluster", "is_initialized", "process_info"]
