"""The package's own import graph, read from the source (``ast``; nothing is imported).

    graph = import_graph(Path("megatron_papo"))
    assert not cycles(graph.edges)                 # tests/unit/test_import_graph.py
    floors(graph.edges)                            # {module: floor}; floor 0 imports nothing of ours

An arrow ``a -> b`` is any ``import``/``from ... import`` in ``a`` of a module ``b`` of the package,
at module level, inside a function, or under ``if TYPE_CHECKING:`` (a newcomer reads all of them).
``collapse`` merges the modules of a sub-package into one node (the map in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LazyImport:
    """A function-level import of one of the package's modules."""

    module: str
    """The importing module (dotted)."""
    target: str
    """The imported module (dotted)."""
    line: int
    reason: str
    """The comment on the import's line (or the line above), "" if none."""


@dataclass
class ImportGraph:
    """Modules of one package (dotted names) and the arrows between them."""

    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    lazy: list[LazyImport] = field(default_factory=list)

    @property
    def num_arrows(self) -> int:
        return sum(len(v) for v in self.edges.values())


def _module_names(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, modules: Mapping[str, Path]) -> list[str]:
    """The package modules an import statement reaches (``from pkg import sub`` -> ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
            here = here[:len(here) - (node.level - 1)]
            base = ".".join([*here, *([node.module] if node.module else [])])
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def _reason(lines: list[str], lineno: int) -> str:
    here = lines[lineno - 1]
    if "#" in here:
        return here.split("#", 1)[1].strip()
    above = lines[lineno - 2].strip() if lineno >= 2 else ""
    return above[1:].strip() if above.startswith("#") else ""


def import_graph(root: Path) -> ImportGraph:
    """The import graph of the package folder ``root`` (e.g. ``Path("megatron_papo")``)."""
    modules = _module_names(root)
    graph = ImportGraph(modules=modules)
    for module, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        lines = text.splitlines()
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, module, modules):
                graph.edges.setdefault(module, set()).add(target)
                if id(node) in in_function:
                    graph.lazy.append(LazyImport(module, target, node.lineno, _reason(lines, node.lineno)))
    return graph


def collapse(edges: Mapping[str, Iterable[str]], package: str,
             keep: Iterable[str] = ()) -> dict[str, set[str]]:
    """Merge each sub-package of ``package`` into one node, except those named in ``keep``
    (whose modules stay separate); self-arrows vanish."""
    keep = set(keep)

    def node(name: str) -> str:
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == package and ".".join(parts[:2]) not in keep:
            return ".".join(parts[:2])
        return name

    out: dict[str, set[str]] = {}
    for a, targets in edges.items():
        out.setdefault(node(a), set())
        for b in targets:
            if node(b) != node(a):
                out[node(a)].add(node(b))
    return out


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import circles: strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    nodes = set(edges) | {b for t in edges.values() for b in t}

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def floors(edges: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """{module: floor}: 0 for a module that imports none of the package, else 1 + the highest
    floor it imports. Defined only without circles (ValueError otherwise)."""
    if cycles(edges):
        raise ValueError(f"import circles: {cycles(edges)}")
    nodes = set(edges) | {b for t in edges.values() for b in t}
    memo: dict[str, int] = {}

    def floor(v: str) -> int:
        if v not in memo:
            memo[v] = 1 + max((floor(w) for w in edges.get(v, ())), default=-1)
        return memo[v]

    return {v: floor(v) for v in sorted(nodes)}
