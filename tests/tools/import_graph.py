"""The layering check: the project's import graph has no cycles and points the right way.

Run ``python -m tests.tools.import_graph``: it prints every violation and exits 1, or exits 0 when
the graph is clean. ``tests/test_import_graph.py`` runs the same check in the suite.

What it reads: every ``.py`` file under the project's packages (``PACKAGES``), parsed with ``ast``.
Every ``import``/``from … import`` counts, at module level and inside functions or classes (a
function-level import is still a dependency; it only hides a cycle from the interpreter). An import
inside ``if TYPE_CHECKING:`` is recorded as *type-only*.

What it checks:

(a) no cycle between modules (Tarjan's strongly connected components over runtime imports; each
    cycle is reported). Type-only imports do not count here: they never run, so they are the
    allowed way to break a cycle that exists only for annotations…
(b) …but they do count for everything else: no cycle between top-level folders (``nat`` →
    ``protocols`` → ``nat`` is a violation even when the modules involved differ), and
(c) the directions: nothing outside ``node/`` imports ``node`` (``tests/`` and ``bench/`` are not
    scanned and may import anything); the peer-to-peer folders stack one way, ``protocols`` >
    ``dht`` > ``nat`` > ``wire`` (a folder imports only those below it); ``runtime/`` imports
    nothing of ``dht``, ``protocols``, ``nat``, ``wire``, ``node``, ``bootstrap`` and nothing of
    ``libp2p``.

An edge ``from a.b import c`` goes to the module ``a.b.c`` when that is a module, else to ``a.b``.
Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``; those implicit parent
edges are left out, since every package's own ``__init__`` would otherwise sit on a cycle with its
children.

``ALLOWED`` lists known violations that remain, each with its reason; a violation not in it fails.
An entry that no longer matches anything also fails, so the list only shrinks.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("node", "protocols", "dht", "nat", "wire", "runtime", "bootstrap")

# Directions: folder -> folders (or third-party top-level names) it must not import.
# The peer-to-peer folders stack one way: node > protocols > dht > nat > wire > runtime.
FORBIDDEN: dict[str, frozenset[str]] = {
    "protocols": frozenset({"node"}),
    "dht": frozenset({"node", "protocols"}),
    "nat": frozenset({"node", "protocols", "dht"}),
    "wire": frozenset({"node", "protocols", "dht", "nat", "bootstrap"}),
    "bootstrap": frozenset({"node"}),
    "runtime": frozenset({"dht", "protocols", "nat", "wire", "node", "bootstrap", "libp2p"}),
}

DETAIL = " -- "  # what follows it in a violation is detail, not matched against ALLOWED

# Known violations still present, as the exact line the check prints, each with its reason.
ALLOWED: dict[str, str] = {}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str  # a project module, or a third-party top-level name
    line: int
    type_only: bool


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def internal(self, *, with_type_only: bool) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for e in self.edges:
            if e.dst in self.modules and e.src != e.dst and (with_type_only or not e.type_only):
                out[e.src].add(e.dst)
        return out


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path = ROOT) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            modules[module_name(path, root)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import node with whether it sits under ``if TYPE_CHECKING:`` (its body, not else)."""

    def walk(node: ast.AST, type_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_only
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                yield from walk(stmt, True)
            for stmt in node.orelse:
                yield from walk(stmt, type_only)
            return
        for child in ast.iter_child_nodes(node):
            yield from walk(child, type_only)

    yield from walk(tree, False)


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``name`` that is a project module, or its top-level name."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return parts[0]


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, modules: dict[str, Path]) -> Iterable[str]:
    if isinstance(node, ast.Import):
        return [_resolve(alias.name, modules) for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_pkg else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base]) if base else ".".join(anchor)
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in modules else _resolve(base, modules))
    return out


def build(root: Path = ROOT) -> Graph:
    graph = Graph(modules=discover(root))
    for module, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node, type_only in _imports(tree):
            for dst in _targets(node, module, is_pkg, graph.modules):
                graph.edges.append(Edge(module, dst, node.lineno, type_only))
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); returns the components with more than one member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def _a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first member (shortest, by BFS)."""
    members = set(component)
    start = component[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    return component


def violations(graph: Graph) -> list[str]:
    found: list[str] = []
    runtime = graph.internal(with_type_only=False)
    for component in strongly_connected(runtime):
        cycle = _a_cycle(runtime, component)
        extra = f" (component of {len(component)}: {', '.join(component)})" if len(component) + 1 > len(cycle) else ""
        found.append(f"module cycle: {' -> '.join(cycle)}{extra}")

    folders: dict[str, set[str]] = {pkg: set() for pkg in PACKAGES}
    witness: dict[tuple[str, str], Edge] = {}
    for e in graph.edges:
        src_top, dst_top = e.src.split(".")[0], e.dst.split(".")[0]
        if dst_top in folders and src_top != dst_top:
            folders[src_top].add(dst_top)
            witness.setdefault((src_top, dst_top), e)
        if dst_top in FORBIDDEN.get(src_top, frozenset()):
            kind = " (type-only)" if e.type_only else ""
            found.append(f"forbidden: {e.src} imports {e.dst}{kind}  [{src_top} must not import {dst_top}]")
    for component in strongly_connected(folders):
        cycle = _a_cycle(folders, component)
        steps = []
        for a, b in itertools.pairwise(cycle):
            w = witness[(a, b)]
            steps.append(f"{a} -> {b} (e.g. {w.src} -> {w.dst})")
        # The detail (one path and an example edge per step) is not part of the key ALLOWED matches.
        found.append(f"folder cycle among {', '.join(component)}" + DETAIL + "; ".join(steps))
    return sorted(set(found))


def type_only_cycles(graph: Graph) -> list[list[str]]:
    """Module cycles that exist only through ``if TYPE_CHECKING:`` imports: allowed, printed as notes."""
    runtime = {tuple(c) for c in strongly_connected(graph.internal(with_type_only=False))}
    full = graph.internal(with_type_only=True)
    return [_a_cycle(full, c) for c in strongly_connected(full) if tuple(c) not in runtime]


def check(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(violations not in ALLOWED, ALLOWED entries that matched nothing)."""
    found = violations(build(root))
    keys = {v.split(DETAIL)[0] for v in found}
    new = [v for v in found if v.split(DETAIL)[0] not in ALLOWED]
    stale = [a for a in ALLOWED if a not in keys]
    return new, stale


def main() -> int:
    new, stale = check()
    for cycle in type_only_cycles(build()):
        print(f"note: cycle closed only by TYPE_CHECKING imports (allowed): {' -> '.join(cycle)}")
    for v in new:
        print(v)
    for a in stale:
        print(f"stale allowed entry (fixed? remove it from ALLOWED): {a}")
    if new or stale:
        print(f"\n{len(new)} violation(s), {len(stale)} stale allowed entr(y/ies)", file=sys.stderr)
        return 1
    print(f"import graph clean ({len(ALLOWED)} known exception(s) allowed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
