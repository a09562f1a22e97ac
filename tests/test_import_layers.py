"""The packages import in layers, so that no import cycle can form. Lowest first; a module imports only from its
own layer or the ones below:

1. `kv_cache`: block bookkeeping, the page pool, the attention backends. No engine module (the CPU backend gets
   the built C++ kernels as an argument); `kv_cache.backends` chooses between the backends, above both.
2. The engine's model layer, what the engine and the proposers both need: `engine.sampling_params`,
   `engine.sampler` and `engine.model_runner`, with what they import (`engine.config`, `loader`, `model`,
   `parallel`, `cpu_kernels`, `default_model`).
3. `speculator`: the proposers and verification; of the engine, only the model layer (MODEL_LAYER).
4. The rest of `engine`: scheduler, step loop, asyncio driver, detokenizer, benchmarks.
5. `deployments`: the Ray actors and the Serve app. Only `engine.cli`, the command line, sits above them (it
   starts `specserve serve`), which is why the engine imports `deployments` from there alone.

Imports are read from the source (function-level ones included), not by importing anything. Run this file as
a script to print the package-level edges and any cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kv_cache", "engine", "speculator", "deployments")
MODEL_LAYER = {"engine.sampling_params", "engine.sampler", "engine.model_runner"}
MODEL_LAYER_IMPORTS = {"engine.config", "engine.loader", "engine.model", "engine.parallel", "engine.cpu_kernels"}
MODEL_LAYER_IMPORTS |= {"engine.default_model"}
ABOVE_DEPLOYMENTS = {"engine.cli"}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    files = {
        pkg if f.stem == "__init__" else f"{pkg}.{f.stem}": f for pkg in PACKAGES for f in (REPO / pkg).glob("*.py")
    }
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
    assert "engine.llm_engine" in graph and "deployments.serve_main" in graph["engine.cli"]  # imported in a function
    assert "speculator.proposer" in graph["speculator.ngram"]


def test_cycles_finds_every_strongly_connected_group():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_no_module_import_cycle():
    assert cycles(import_graph()) == []


def test_kv_cache_imports_no_engine_module():
    graph = import_graph()
    wrong = {(m, t) for m, ts in graph.items() if m.startswith("kv_cache") for t in ts if not t.startswith("kv_cache")}
    assert wrong == set()


def test_speculator_imports_only_the_engines_model_layer():
    graph = import_graph()
    wrong = {
        (m, t)
        for m, ts in graph.items()
        if m.startswith("speculator")
        for t in ts
        if t not in MODEL_LAYER and not t.startswith(("speculator", "kv_cache"))
    }
    assert wrong == set()


def test_model_layer_stays_below_the_proposers_and_the_step_loop():
    """What the model layer imports, however indirectly, is in its own layer or in kv_cache."""
    graph = import_graph()
    reached, todo = set(), list(MODEL_LAYER)
    while todo:
        for t in graph[todo.pop()] - reached:
            reached.add(t)
            todo.append(t)
    assert {t for t in reached if not t.startswith("kv_cache")} - MODEL_LAYER - MODEL_LAYER_IMPORTS == set()


def test_engine_imports_deployments_only_from_the_command_line():
    edges = package_edges(import_graph())
    assert {src for src, _ in edges.get(("engine", "deployments"), set())} <= ABOVE_DEPLOYMENTS


if __name__ == "__main__":
    g = import_graph()
    for (a, b), imports in sorted(package_edges(g).items()):
        back = " (and back: a package cycle)" if (b, a) in package_edges(g) else ""
        print(f"{a} -> {b}: {len(imports)} import(s){back}")
        if back:
            for src, dst in sorted(imports):
                print(f"    {src} -> {dst}")
    print("module cycles:", cycles(g) or "none")
