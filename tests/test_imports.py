"""The import graph of ``v4jax`` and ``kernels_pallas`` goes one way (issue #23).

Read from the code (``ast``; nothing is imported): no import cycle, no import of a project module
inside a function except in command-line modules (``*/cli.py``, ``*_cli.py``: lazy imports keep
``--help`` fast), and the layers below, lowest first, each importing only from itself and lower
layers. ``from pkg import name`` counts as an import of the submodule that defines ``name`` when
``pkg/__init__.py`` only hands it on (a package's face makes no edge of its own), as in
``../shared/tools/import_graph.py``. The checker is tried on a small package with a known cycle,
a lazy import and an upward import, so that it cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("v4jax", "kernels_pallas")

# lowest first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, ...]] = [
    # a leaf library: imports nothing of v4jax
    ("kernels_pallas",),
    # leaves of v4jax: the config, the rules table and the active mesh, input checks, layers, data,
    # the host's malloc tunables
    ("v4jax.config", "v4jax.runtime", "v4jax.host", "v4jax.sharding", "v4jax.inputs", "v4jax.layers", "v4jax.data",
     "v4jax.weights.naming", "v4jax.weights.quant", "v4jax.weights.safetensors_io",
     "v4jax.inference.sampling", "v4jax.train.metrics", "v4jax.train.preemption", "v4jax.parallel.distributed",
     "v4jax.parallel.mesh"),
    ("v4jax.hyper_connection", "v4jax.attention", "v4jax.moe"),
    ("v4jax.model",),
    # what reads the model's variables, and the serving layer (works on a model object it is given)
    ("v4jax.params", "v4jax.parallel.placement", "v4jax.weights", "v4jax.train.losses", "v4jax.train.optimizer",
     "v4jax.train.config", "v4jax.inference"),
    # the model facade
    ("v4jax.api",),
    # training, checkpoints, the planner, the command lines and the package's face
    ("v4jax.checkpoint", "v4jax.train", "v4jax.parallel.plan", "v4jax.inference.generate_cli",
     "v4jax.inference.cache_report_cli", "v4jax"),
]


def _module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules(root: str, packages) -> dict[str, str]:
    mods = {}
    for pkg in packages:
        for dirpath, dirnames, files in os.walk(os.path.join(root, pkg)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__pycache__"))]
            for f in files:
                if f.endswith(".py"):
                    mods[_module_name(root, os.path.join(dirpath, f))] = os.path.join(dirpath, f)
    return mods


def _imports(mod: str, path: str):
    """(target module, names, line, inside a function) for every import of ``path``."""
    is_pkg = path.endswith("__init__.py")
    found = []

    def visit(node, depth):
        for child in ast.iter_child_nodes(node):
            d = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]), d)   # `if TYPE_CHECKING:` never runs
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno, d > 0) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = child.module
                if child.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[: len(parts) - (child.level - 1)]
                    target = ".".join(parts + ([child.module] if child.module else []))
                found.append((target, [a.name for a in child.names], child.lineno, d > 0))
            visit(child, d)

    visit(ast.parse(open(path, encoding="utf-8").read(), path), 0)
    return found


def import_edges(root: str, packages=PACKAGES) -> tuple[dict, dict]:
    """modules {name: path}, edges {(a, b): [(line, lazy)]} between project modules."""
    mods = _modules(root, packages)
    faces = {}
    for mod, path in mods.items():
        if path.endswith("__init__.py"):
            faces[mod] = {n: t for t, names, _, lazy in _imports(mod, path) if not lazy and t in mods for n in names}
    edges = defaultdict(list)
    for mod, path in mods.items():
        for target, names, line, lazy in _imports(mod, path):
            goals = []
            for n in names:
                if f"{target}.{n}" in mods:
                    goals.append(f"{target}.{n}")
                elif n in faces.get(target, {}) and mod != target:
                    goals.append(faces[target][n])
                elif target in mods:
                    goals.append(target)
            if not names and target in mods:
                goals.append(target)
            for g in goals:
                if g != mod:
                    edges[(mod, g)].append((line, lazy))
    return mods, edges


def find_cycles(mods, edges) -> list[list[str]]:
    """Strongly connected sets of more than one module (iterative Tarjan)."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, on, stack, out, counter = {}, {}, set(), [], [], 0
    for start in sorted(mods):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def is_cli(path: str) -> bool:
    return os.path.basename(path) == "cli.py" or path.endswith("_cli.py")


def lazy_imports(mods, edges) -> list[str]:
    return sorted(f"{a}:{line} -> {b}" for (a, b), uses in edges.items() for line, lazy in uses
                  if lazy and not is_cli(mods[a]))


def layer_of(mod: str, layers) -> int | None:
    best, best_len = None, -1
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def upward_imports(mods, edges, layers) -> list[str]:
    out = []
    for (a, b) in sorted(edges):
        la, lb = layer_of(a, layers), layer_of(b, layers)
        if la is None or lb is None or lb > la:
            out.append(f"{a} (layer {la}) -> {b} (layer {lb})")
    return out


@pytest.fixture(scope="module")
def graph():
    return import_edges(ROOT)


def test_no_import_cycles(graph):
    mods, edges = graph
    assert len(mods) > 80 and len(edges) > 200       # the whole project was read
    assert find_cycles(mods, edges) == []


def test_imports_at_module_level_outside_clis(graph):
    mods, edges = graph
    assert lazy_imports(mods, edges) == []
    # the command lines keep theirs (``--help`` without importing the model)
    assert any(lazy and is_cli(mods[a]) for (a, _), uses in edges.items() for _, lazy in uses)


def test_layers_import_downward_only(graph):
    mods, edges = graph
    assert [m for m in mods if layer_of(m, LAYERS) is None] == []
    assert upward_imports(mods, edges, LAYERS) == []
    # kernels_pallas is a leaf library, the rules table and the input checks are leaves
    for leaf in ("kernels_pallas", "v4jax.sharding", "v4jax.inputs", "v4jax.config"):
        assert [b for (a, b) in edges if (a == leaf or a.startswith(leaf + ".")) and not b.startswith(leaf)] == []


def test_checker_finds_cycles_lazy_and_upward_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import fa\n")
    (pkg / "a.py").write_text("from pkg.b import fb\n\ndef fa():\n    return fb()\n")
    (pkg / "b.py").write_text("def fb():\n    from pkg import fa   # through the face: an edge to pkg.a\n    return fa\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "cli.py").write_text("def main():\n    import pkg.a\n")
    (pkg / "c.py").write_text("import pkg.sub.cli\n")
    mods, edges = import_edges(str(tmp_path), ("pkg",))
    assert find_cycles(mods, edges) == [["pkg.a", "pkg.b"]]
    assert lazy_imports(mods, edges) == ["pkg.b:2 -> pkg.a"]          # the CLI's own is allowed
    layers = [("pkg.c", "pkg.b"), ("pkg.a", "pkg.sub"), ("pkg",)]
    assert upward_imports(mods, edges, layers) == ["pkg.b (layer 0) -> pkg.a (layer 1)",
                                                   "pkg.c (layer 0) -> pkg.sub.cli (layer 1)"]
