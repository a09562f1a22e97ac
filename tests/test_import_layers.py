"""The packages import in layers, so that no import cycle can form, between modules or between packages.
Lowest first; a package imports only from itself and the packages below it:

1. `kv_cache`: the paged block manager, plain Python.
2. `sampling`: sampling parameters and the sampler (temperature, top-k, top-p, seeded generators).
3. `model`: the decoder, its loader, the C++ kernels, the paged attention backends and KV pages, the model runner
   and the engine's config (every layer from the runner up reads it).
4. `speculator`: the proposers and lossless verification.
5. `engine`: the scheduler, the step loop, the asyncio driver, detokenization.
6. `deployments`: the Ray actors and the Serve app.
7. `cluster`: a local cluster for tests and benchmarks, and the fault-injecting client.
8. `cli`: the command line (`specserve generate|bench|serve`).

Imports are read from the source (function-level ones included), not by importing anything. Run this file as
a script to print the package-level edges and any cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("kv_cache", "sampling", "model", "speculator", "engine", "deployments", "cluster", "cli")


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    files = {}
    for pkg in LAYERS:
        for f in (REPO / pkg).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import module` names a module; `from module import name` the module itself.
                targets.update(
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names
                )
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """(package, package) -> the module imports that make the edge."""
    edges: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for src, targets in graph.items():
        for dst in targets:
            a, b = src.split(".")[0], dst.split(".")[0]
            if a != b:
                edges.setdefault((a, b), set()).add((src, dst))
    return edges


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "engine.llm_engine" in graph and "cli.serve" in graph["cli.main"]  # imported in a function
    assert "speculator.proposer" in graph["speculator.ngram"]


def test_cycles_finds_every_strongly_connected_group():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_no_module_import_cycle():
    assert cycles(import_graph()) == []


def test_packages_import_only_their_own_layer_and_those_below():
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    upward = {(a, b): sorted(m) for (a, b), m in package_edges(import_graph()).items() if rank[b] > rank[a]}
    assert upward == {}


if __name__ == "__main__":
    g = import_graph()
    for (a, b), imports in sorted(package_edges(g).items()):
        back = " (and back: a package cycle)" if (b, a) in package_edges(g) else ""
        print(f"{a} -> {b}: {len(imports)} import(s){back}")
        if back:
            for src, dst in sorted(imports):
                print(f"    {src} -> {dst}")
    print("module cycles:", cycles(g) or "none")
