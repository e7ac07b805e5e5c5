"""``v4jax.host``: glibc's huge-page malloc for XLA:CPU (the environment rules, and the re-execution
of a real process: the command line, the variables and the exit status carried over)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from v4jax import host

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_tuned_environ_adds_the_tunable_and_keeps_the_rest():
    assert host.tuned_environ({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    got = host.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert got == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
    # an explicit choice (also "off") is the user's: left as it is
    for tun in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"):
        assert host.tuned_environ({"GLIBC_TUNABLES": tun})["GLIBC_TUNABLES"] == tun


def test_hugepages_requested():
    assert not host.hugepages_requested({})
    assert not host.hugepages_requested({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not host.hugepages_requested({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert host.hugepages_requested({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"})
    assert host.hugepages_requested(host.tuned_environ({}))


# the child re-executes itself, then reports what the new process sees and exits with a code of its own
_CHILD = """
import os, sys
from v4jax import host
if not os.environ.get("V4JAX_HOST_REEXEC"):
    print(os.getpid(), file=sys.stderr)
host.reexec_with_hugepages()
print(os.environ.get("GLIBC_TUNABLES"), os.environ.get("V4JAX_HOST_REEXEC"), sys.argv[1:], os.getpid(), sep="|")
sys.exit(int(sys.argv[2]))
"""


def _child(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT, "V4JAX_HOST_REEXEC")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not GLIBC, reason="the tunable is glibc's (Linux)")
def test_reexec_sets_the_tunable_once_and_keeps_argv_and_exit_status():
    r = _child({}, "0", "7", "--flag")
    assert r.returncode == 7, r.stderr
    tun, guard, argv, pid = r.stdout.strip().split("|")
    assert tun == "glibc.malloc.hugetlb=1" and guard == "1" and argv == "['0', '7', '--flag']"
    assert pid == r.stderr.split()[0]          # the same process (exec), once
    # other tunables stay; an explicit setting, or the opt-out, means no re-execution
    r = _child({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "0", "0")
    assert r.stdout.split("|")[:2] == ["glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "1"]
    r = _child({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "0", "0")
    assert r.stdout.split("|")[:2] == ["glibc.malloc.hugetlb=0", "None"]
    r = _child({host.OPT_OUT: "0"}, "0", "0")
    assert r.stdout.split("|")[:2] == ["None", "None"]
