"""Host-process malloc settings that XLA:CPU's speed depends on (issue #23).

XLA:CPU allocates a compiled program's temporaries for every execution (about 1.5 GB for the tiny
8 x 256 train step) and glibc serves blocks that large with ``mmap`` and gives them back with
``munmap`` when the step ends. Every step then touches fresh 4 KiB pages, which the kernel must
fault in and zero: about 320,000 page faults and 1.3 s of kernel time per tiny step on the 2-core
CI machine, a quarter of the step's CPU time. Four glibc tunables (``TUNABLES``) keep that memory:

* ``glibc.malloc.mmap_max=0``: no block is served by ``mmap`` (all from the heap);
* ``glibc.malloc.arena_max=1``: one heap for every thread (a thread's own arena is at most 64 MiB
  and would fall back to ``mmap`` for these blocks);
* ``glibc.malloc.trim_threshold=16 GiB``: freed memory stays in the heap for the next step;
* ``glibc.malloc.hugetlb=1``: that heap on transparent huge pages (``madvise``, the usual kernel
  default, honours it).

Measured on the tiny train step (``experiments/results/throughput``): page faults 320,000 -> 0 per
step, kernel time 1.3 s -> 0.01 s, step 2.9 s -> 1.6-1.9 s. The cost: the process keeps its peak
heap (it does not shrink between steps), which a training process reaches every step anyway.

The tunables are read when a process starts, so a running Python cannot set them (a library
cannot fix this after ``import``). The command-line tools ``v4jax-train`` and ``v4jax-eval``
re-execute themselves once with them (``reexec_tuned``), as do the benchmarks under
``experiments/`` and the test suite's workers; for your own script set them before Python starts::

    export GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=17179869184:glibc.malloc.hugetlb=1

(``python -c "import v4jax.host as h; print(h.tunables_string())"`` prints it).
``V4JAX_HOST_TUNING=0`` turns the re-execution off; a ``GLIBC_TUNABLES`` that already names one of
these tunables is the user's choice and is left alone. Other C libraries (musl) and systems ignore
all of this. Only the standard library is imported here: it runs before jax.
"""

from __future__ import annotations

import os
import platform
import sys

# experiments/profile_step.py keeps a literal copy (it profiles checkouts older than this module);
# tests/test_host.py checks that the two agree.
TUNABLES = {
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.trim_threshold": str(16 << 30),
    "glibc.malloc.hugetlb": "1",
}
OPT_OUT = "V4JAX_HOST_TUNING"       # "0": never re-execute
_GUARD = "V4JAX_HOST_REEXEC"        # set in the re-executed process: at most one exec


def tunables_string() -> str:
    """``TUNABLES`` as a ``GLIBC_TUNABLES`` value."""
    return ":".join(f"{k}={v}" for k, v in TUNABLES.items())


def _settings(env) -> dict[str, str]:
    out = {}
    for item in env.get("GLIBC_TUNABLES", "").split(":"):
        name, eq, value = item.partition("=")
        if eq:
            out[name.strip()] = value.strip()
    return out


def tuned(env=None) -> bool:
    """Whether ``GLIBC_TUNABLES`` in ``env`` (default ``os.environ``) holds every one of
    ``TUNABLES`` with its value (a process's malloc follows what it started with)."""
    got = _settings(os.environ if env is None else env)
    return all(got.get(k) == v for k, v in TUNABLES.items())


def user_chose(env=None) -> bool:
    """Whether ``GLIBC_TUNABLES`` already names any of ``TUNABLES`` (then it is left as it is)."""
    return bool(set(_settings(os.environ if env is None else env)) & set(TUNABLES))


def tuned_environ(env=None) -> dict:
    """A copy of ``env`` (default ``os.environ``) with ``TUNABLES`` appended to ``GLIBC_TUNABLES``
    (other tunables kept). Unchanged when it already names one of them (``user_chose``)."""
    out = dict(os.environ if env is None else env)
    if not user_chose(out):
        tun = out.get("GLIBC_TUNABLES", "")
        out["GLIBC_TUNABLES"] = f"{tun}:{tunables_string()}" if tun else tunables_string()
    return out


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def reexec_tuned() -> None:
    """Replace this process by the same command line with ``TUNABLES``, unless the environment
    already names one of them (``user_chose``), ``V4JAX_HOST_TUNING=0`` is set, it was already
    re-executed once, or the C library is not glibc on Linux. Call it first thing in a command-line
    entry point, before the work starts; it returns only when it does nothing. The process id,
    open descriptors and signal dispositions are kept (``os.execve``)."""
    if os.environ.get(OPT_OUT, "1") == "0" or os.environ.get(_GUARD) or not _glibc() or user_chose():
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if not argv or not sys.executable:
        return
    env = tuned_environ()
    env[_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:   # cannot exec (sandbox, odd interpreter): run on untuned
        return
