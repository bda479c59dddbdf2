"""The import graph of netplugin/ and backends/ (every import statement, also
in functions and under TYPE_CHECKING): no circle, and the front-end imports
no backend (a backend is found by name: ``netplugin.backend.load_backend``,
``netplugin.config.backend_tables``)."""
import ast
import os
from typing import Dict, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("netplugin", "backends")

#: circles still there on this branch, each a set of module names
ALLOWED_CYCLES: List[Set[str]] = []

Edges = Dict[str, Dict[str, List[int]]]   # module -> imported module -> line numbers


def modules() -> Dict[str, str]:
    """Dotted module name -> file, for every .py file of PACKAGES."""
    found = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    if module.endswith(".__init__"):
                        module = module[:-len(".__init__")]
                    found[module] = path
    return found


def import_graph() -> Edges:
    mods = modules()
    graph: Edges = {}
    for module, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges: Dict[str, List[int]] = {}

        def add(target: str, line: int) -> None:
            if target != module:
                edges.setdefault(target, []).append(line)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.name
                    while name and name not in mods:   # import a.b.c: the deepest module of ours
                        name = name.rpartition(".")[0]
                    if name:
                        add(name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:   # relative: from the module's package
                    base = module if path.endswith("__init__.py") else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = base + ("." + node.module if node.module else "")
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in mods:        # from package import module
                        add(submodule, node.lineno)
                    elif source in mods:         # from module import name
                        add(source, node.lineno)
        graph[module] = edges
    return graph


def cycles(graph: Edges) -> List[Set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[Set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: List[Tuple[str, List[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def describe(graph: Edges, component: Set[str]) -> str:
    """The circle's modules and the imports that close it (module:line)."""
    lines = [" <-> ".join(sorted(component))]
    for module in sorted(component):
        for target in sorted(set(graph[module]) & component):
            where = ", ".join(str(n) for n in graph[module][target])
            lines.append(f"    {module} imports {target} (line {where})")
    return "\n".join(lines)


def test_the_checker_sees_a_circle():
    graph = {"a": {"b": [1]}, "b": {"c": [2]}, "c": {"a": [3]}, "d": {"a": [4]}}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert "a imports b (line 1)" in describe(graph, {"a", "b", "c"})


def test_no_import_circle():
    graph = import_graph()
    assert "netplugin.config" in graph and "backends.calico.driver" in graph
    unexpected = [c for c in cycles(graph) if c not in ALLOWED_CYCLES]
    assert not unexpected, "import circles:\n" + "\n".join(describe(graph, c) for c in unexpected)


def test_allowed_cycles_still_exist():
    """An allowance whose circle is gone must go too (ALLOWED_CYCLES)."""
    found = cycles(import_graph())
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert not stale, f"these circles are cut: remove them from ALLOWED_CYCLES: {stale}"


def test_the_front_end_imports_no_backend():
    graph = import_graph()
    bad = [f"{module} imports {target} (line {', '.join(map(str, lines))})"
           for module, edges in sorted(graph.items()) if module.split(".")[0] == "netplugin"
           for target, lines in sorted(edges.items()) if target.split(".")[0] == "backends"]
    assert not bad, "the front-end (netplugin/) imports a backend:\n" + "\n".join(bad)
