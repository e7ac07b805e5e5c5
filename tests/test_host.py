"""``v4jax.host``: malloc tuned for XLA:CPU (the environment rules; the re-execution of a real
process with its command line, variables, process id and exit status; and that the tunables do
what the module says: a freed large block is reused without page faults)."""

from __future__ import annotations

import ast
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from v4jax import host

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
ALL = host.tunables_string()


def test_tuned_environ_adds_the_tunables_and_keeps_the_rest():
    assert host.tuned_environ({})["GLIBC_TUNABLES"] == ALL
    got = host.tuned_environ({"GLIBC_TUNABLES": "glibc.rtld.nns=2", "X": "1"})
    assert got == {"GLIBC_TUNABLES": f"glibc.rtld.nns=2:{ALL}", "X": "1"}
    assert host.tuned(got) and host.tuned({"GLIBC_TUNABLES": ALL}) and not host.tuned({})
    # a setting of any of them (also "off") is the user's choice: left as it is
    for tun in ("glibc.malloc.hugetlb=0", "glibc.rtld.nns=2:glibc.malloc.arena_max=4"):
        assert host.user_chose({"GLIBC_TUNABLES": tun})
        assert host.tuned_environ({"GLIBC_TUNABLES": tun})["GLIBC_TUNABLES"] == tun
        assert not host.tuned({"GLIBC_TUNABLES": tun})
    assert ALL.count("=") == len(host.TUNABLES) and "glibc.malloc.mmap_max=0" in ALL


_CHILD = """
import os, sys
from v4jax import host
if not os.environ.get("V4JAX_HOST_REEXEC"):
    print(os.getpid(), file=sys.stderr)
host.reexec_tuned()
print(os.environ.get("GLIBC_TUNABLES"), os.environ.get("V4JAX_HOST_REEXEC"), sys.argv[1:], os.getpid(), sep="|")
sys.exit(int(sys.argv[1]))
"""


def _run(code: str, env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT, "V4JAX_HOST_REEXEC")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not GLIBC, reason="the tunables are glibc's (Linux)")
def test_reexec_once_with_argv_pid_and_exit_status():
    r = _run(_CHILD, {}, "7", "--flag")
    assert r.returncode == 7, r.stderr
    tun, guard, argv, pid = r.stdout.strip().split("|")
    assert tun == ALL and guard == "1" and argv == "['7', '--flag']"
    assert pid == r.stderr.split()[0]                          # the same process (exec), once
    r = _run(_CHILD, {"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, "0")
    assert r.stdout.split("|")[:2] == [f"glibc.rtld.nns=2:{ALL}", "1"]
    r = _run(_CHILD, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "0")     # the user's choice
    assert r.stdout.split("|")[:2] == ["glibc.malloc.hugetlb=0", "None"]
    r = _run(_CHILD, {host.OPT_OUT: "0"}, "0")                               # opted out
    assert r.stdout.split("|")[:2] == ["None", "None"]


# allocate, touch and free a 256 MiB block 4 times; print the minor page faults of the last 3
_FAULTS = """
import resource, numpy as np
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = []
for i in range(4):
    f0 = faults(); a = np.ones(64 << 20, np.float32); a.sum(); del a; n.append(faults() - f0)
print(sum(n[1:]))
"""


@pytest.mark.skipif(not GLIBC, reason="the tunables are glibc's (Linux)")
def test_tunables_reuse_freed_memory_without_page_faults():
    # numpy's own huge-page madvise off, so that the plain count is in 4 KiB pages (as XLA's buffers)
    plain = int(_run(_FAULTS, {"NUMPY_MADVISE_HUGEPAGE": "0"}).stdout)
    tuned = int(_run(_FAULTS, {"NUMPY_MADVISE_HUGEPAGE": "0", "GLIBC_TUNABLES": ALL}).stdout)
    assert plain >= 3 * 65536                    # plain glibc: each block mmapped, 65,536 pages faulted anew
    assert tuned < 100, (plain, tuned)           # tuned: the freed block stays in the heap, reused


def test_profile_step_copy_of_the_tunables_matches_host():
    """experiments/profile_step.py carries its own copy (to profile older checkouts): no drift."""
    src = (pathlib.Path(__file__).parents[1] / "experiments" / "profile_step.py").read_text()
    (copy,) = [ast.literal_eval(node.value) for node in ast.walk(ast.parse(src))
               if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_TUNABLES" for t in node.targets)]
    assert copy == host.tunables_string()
