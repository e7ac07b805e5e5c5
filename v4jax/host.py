"""Host-process settings that XLA:CPU's speed depends on (issue #23).

XLA:CPU allocates a compiled program's temporaries for every execution (about 1.5 GB for the tiny
8 x 256 train step) and glibc serves blocks that large with ``mmap`` and returns them with
``munmap`` when the step ends. Each step then touches fresh 4 KiB pages: about 320,000 page faults
and 1.3 s of kernel time per tiny step on the 2-core CI machine, a quarter of the CPU time
(``experiments/results/throughput``). glibc's ``glibc.malloc.hugetlb=1`` tunable makes malloc
ask for transparent huge pages (``madvise(MADV_HUGEPAGE)``; the kernel setting ``madvise``, the
usual default, honours it): the same step takes about 1,000 faults and 0.25 s of kernel time.

The tunable is read when the process starts, so it cannot be set from inside a running Python
(a library cannot fix it after ``import``). The command-line tools (``v4jax-train``,
``v4jax-eval``, ``v4jax-generate``) re-execute themselves once with it (``reexec_with_hugepages``),
as do the benchmarks under ``experiments/``; in your own process set it before Python starts::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py

``V4JAX_HUGEPAGES=0`` turns the re-execution off. Other C libraries (musl) and other systems
ignore all of this. Only the standard library is imported here: this module runs before jax.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
HUGEPAGES = f"{TUNABLE}=1"
OPT_OUT = "V4JAX_HUGEPAGES"       # "0": never re-execute
_GUARD = "V4JAX_HOST_REEXEC"      # set in the re-executed process: at most one exec


def _setting(env) -> str | None:
    """The value ``GLIBC_TUNABLES`` in ``env`` gives ``glibc.malloc.hugetlb``, None if unset."""
    for item in env.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name.strip() == TUNABLE:
            return value.strip()
    return None


def hugepages_requested(env=None) -> bool:
    """Whether ``GLIBC_TUNABLES`` in ``env`` (default ``os.environ``) sets ``glibc.malloc.hugetlb``
    to a non-zero value (the running process's allocator follows what it started with)."""
    return _setting(os.environ if env is None else env) not in (None, "", "0")


def tuned_environ(env=None) -> dict:
    """A copy of ``env`` (default ``os.environ``) with ``glibc.malloc.hugetlb=1`` added to
    ``GLIBC_TUNABLES`` (other tunables kept; an explicit setting of it is left as it is)."""
    out = dict(os.environ if env is None else env)
    tun = out.get("GLIBC_TUNABLES", "")
    if _setting(out) is None:
        out["GLIBC_TUNABLES"] = f"{tun}:{HUGEPAGES}" if tun else HUGEPAGES
    return out


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def reexec_with_hugepages() -> None:
    """Replace this process by the same command line with ``glibc.malloc.hugetlb=1``, unless it
    already has it (or any explicit ``glibc.malloc.hugetlb``), ``V4JAX_HUGEPAGES=0`` is set, it
    was already re-executed once, or the C library is not glibc on Linux. Call it first thing in
    a command-line entry point, before anything allocates; it returns only when it does nothing.
    The process id, open descriptors and signal dispositions are kept (``os.execve``)."""
    if os.environ.get(OPT_OUT, "1") == "0" or os.environ.get(_GUARD) or not _glibc() or _setting(os.environ) is not None:
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
    except OSError:   # cannot exec (sandbox, odd interpreter): run on without the tunable
        return
