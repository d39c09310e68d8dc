"""The import graph: dependencies point one way (entry points -> features -> core), with no cycles.

Read from the source with `ast`, module-level and function-level imports alike, so an import
hidden in a function to dodge a cycle counts too. The layers are the package docstring's.
"""
from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Import name -> source folder (setup.py maps the top-level folders into the package).
PACKAGES = {"blip2_triton": "src/blip2_triton", "blip2_triton.export": "export", "blip2_triton.client": "client",
            "blip2_triton.benchmarks": "benchmarks", "blip2_triton.model_repository": "model_repository"}
CORE = ("specs", "families", "api", "errors", "pbtxt", "repository", "generation", "progress", "sizing")
FEATURES = ("export", "serving", "server", "client", "benchmarks", "toy", "model_repository", "frontend")
ENTRY_POINTS = ("cli", "demo")
# What each feature may import besides the core: the served code must not pull in the exporter
# (torch tracing) or the client, and the client only the core (its users install no torch).
ALLOWED = {
    "serving": set(),
    "client": set(),
    "frontend": {"client"},  # the OpenAI front door speaks to Triton only through the client
    "server": {"serving"},
    "export": {"serving", "model_repository"},  # the gate runs graphs with the serving code's sessions; model.py sources
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            if package == "blip2_triton" and parts and f"blip2_triton.{parts[0]}" in PACKAGES:
                continue
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> tuple[str, str]:
    """(layer, part): core/feature/entry and the top-level name under blip2_triton."""
    part = module.split(".")[1] if "." in module else ""
    for kind, names in (("core", CORE), ("feature", FEATURES), ("entry", ENTRY_POINTS)):
        if part in names:
            return kind, part
    return "unknown", part


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = collections.defaultdict(set)
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "blip2_triton" and layer(m)[0] == "unknown"] == []


def test_dependencies_point_one_way():
    order = {"core": 0, "feature": 1, "entry": 2}
    wrong = []
    for source, targets in imports(modules()).items():
        kind, part = layer(source)
        for target in targets:
            target_kind, target_part = layer(target)
            if target == "blip2_triton" or target_part == part:
                continue
            if order[target_kind] > order[kind]:
                wrong.append(f"{source} -> {target} (up from {kind} to {target_kind})")
            elif kind == target_kind == "feature" and part in ALLOWED and target_part not in ALLOWED[part]:
                wrong.append(f"{source} -> {target} ({part} may import only the core and {sorted(ALLOWED[part])})")
    assert wrong == []


def test_no_import_cycles():
    graph = imports(modules())
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                cycles.append(sorted([v, *component]))

    for module in list(graph):
        if module not in index:
            visit(module)
    assert cycles == []
