"""Shared parts of ``experiments/benchmarks.py``: paths, host info, JSON output, tables and plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from importlib import metadata

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # experiments/
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import decode_bench as db  # noqa: E402  (experiments/decode_bench.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402

import v4jax  # noqa: E402
from v4jax import host  # noqa: E402
from v4jax.moe.experts import resolve_impl  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "benchmarks")
HF_PY = "/work/hfvenv/bin/python"
DEFAULT_TORCH_PYTHON = HF_PY if os.path.exists(HF_PY) else ""
TRAIN_WORKER = os.path.join(HERE, "_hf_train_worker.py")
LONG_SCRIPT = os.path.join(HERE, "long_context_bench.py")
COMPILE_SCRIPT = os.path.join(HERE, "compile_bench.py")
PASSTHROUGH = ("long-context", "compile")


def resolved_moe(impl: str) -> str:
    """The MoE dispatch ``Runtime.moe`` actually runs (``"auto"`` depends on the backend)."""
    try:
        return resolve_impl(impl)
    except ValueError as e:
        return f"{impl} ({e})"


_START = {"load_avg": db.load_avg(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _pkg(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_cpu_model = db.cpu_model


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def command_line() -> str:
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable
    return " ".join([exe, os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + [shlex.quote(a) for a in sys.argv[1:]])


def meta(bench_start_load: str | None = None) -> dict:
    """Host info, versions, command line and date for every JSON this script writes."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "started": _START["date"],
        "command": command_line(),
        "host": {"node": platform.node(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                 "load_avg_at_start": _START["load_avg"],
                 "load_avg_at_bench_start": bench_start_load or _START["load_avg"],
                 "load_avg_at_write": db.load_avg(), "mem_total_gb": _mem_total_gb(),
                 "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"v4jax": v4jax.__version__, "jax": jax.__version__, "jaxlib": _pkg("jaxlib"),
                     "flax": _pkg("flax"), "optax": _pkg("optax"), "numpy": np.__version__},
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        # malloc tuned for XLA:CPU (v4jax.host), for this process and the transformers workers it starts
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "host_tuned": host.tuned(),
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _show(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def write_json(out: str, name: str, payload: dict) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=1)
    print(f"wrote {_show(path)}")
    return path


def fmt(x, spec=".1f", missing="-"):
    return missing if x is None else format(x, spec)


def table(headers: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---:" for _ in headers) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, labels, series: dict[str, list], ylabel: str, log: bool = False) -> None:
    """Grouped bars: one group per label, one bar per series (None = missing)."""
    n = len(series)
    w = 0.8 / max(n, 1)
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        v = [0.0 if a is None else a for a in vals]
        bars = ax.bar(x + (i - (n - 1) / 2) * w, v, w, label=name)
        for b, a in zip(bars, vals):
            ax.annotate("n/a" if a is None else f"{a:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _save_png(plt, fig, out: str, name: str) -> None:
    fig.tight_layout()
    p = os.path.join(out, f"{name}.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    print(f"wrote {_show(p)}")


def banner(title: str) -> str:
    load = db.load_avg()
    print(f"\n=== {title} ===  {platform.node()}  {_cpu_model()}, {os.cpu_count()} CPUs, load avg {load}; "
          f"v4jax {v4jax.__version__}, jax {jax.__version__}", flush=True)
    return load
