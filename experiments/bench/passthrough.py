"""``benchmarks.py long-context`` / ``compile``: run the standalone scripts, embed their JSON."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from bench.common import COMPILE_SCRIPT, LONG_SCRIPT, _show, banner, meta, write_json


def _has_opt(argv: list[str], opt: str) -> bool:
    return any(a == opt or a.startswith(opt + "=") for a in argv)


def _opt_value(argv: list[str], opt: str) -> str | None:
    for i, a in enumerate(argv):
        if a == opt and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(opt + "="):
            return a.split("=", 1)[1]
    return None


def run_passthrough(out: str, which: str, extra: list[str], timeout: float | None = None) -> dict:
    load = banner(which)
    script = LONG_SCRIPT if which == "long-context" else COMPILE_SCRIPT
    argv = list(extra)
    help_only = _has_opt(argv, "-h") or _has_opt(argv, "--help")
    if not _has_opt(argv, "--out") and not help_only:
        argv += ["--out", os.path.join(out, "long_context") if which == "long-context"
                 else os.path.join(out, "compile", "compile.json")]
    cmd = [sys.executable, script] + argv
    print("running:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    wall = time.time() - t0
    if help_only:
        return {"rc": rc}
    stdout_json = []
    for ln in lines:
        s = ln.strip()
        if s.startswith("{") and s.endswith("}"):
            try:
                stdout_json.append(json.loads(s))
            except ValueError:
                pass
    # where the child wrote its JSON
    target = _opt_value(argv, "--out")
    files = []
    if target:
        cands = ([os.path.join(target, f) for f in os.listdir(target) if f.endswith(".json")]
                 if os.path.isdir(target) else [target])
        files = [f for f in cands if os.path.isfile(f) and os.path.getmtime(f) >= t0 - 1]
    child = {}
    for f in files:
        try:
            with open(f) as fh:
                child[_show(f)] = json.load(fh)
        except (OSError, ValueError):
            pass
    name = "long_context" if which == "long-context" else "compile"
    res = {**meta(load), "kind": name, "child_command": " ".join(shlex.quote(c) for c in cmd), "rc": rc,
           "wall_s": wall, "child_json_files": sorted(child), "child_json": child, "stdout_json": stdout_json,
           "stdout_tail": lines[-60:]}
    print(f"{which}: exit code {rc}, wall {wall:.0f}s, JSON: {sorted(child) or '(none written; see stdout_json)'}")
    write_json(out, name, res)
    return res
