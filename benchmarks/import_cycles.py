"""Import cycles among edgellm's modules: parses edgellm/**/*.py with `ast` and prints the
strongly connected components (size > 1, or a module importing itself) of the import graph.

Two graphs: module-level imports only (run when the module is imported; imports under
`if TYPE_CHECKING:` are not run and are left out), then module-level plus function-level
(deferred) imports. `from edgellm.a import b` is an edge to edgellm.a.b when that is a module,
else to edgellm.a (the parent packages Python also initialises are not edges). Exit status 1 when
the module-level graph has a cycle.

    python benchmarks/import_cycles.py [path/to/edgellm]
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, me: str, is_pkg: bool) -> tuple[list[str], list[str]]:
    """(module-level, function-level) imported module names, as written (not yet resolved)."""
    top: list[str] = []
    deferred: list[str] = []

    def names(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:  # relative: strip `level` trailing parts (a package counts as its own parent)
            pkg = me.split(".") if is_pkg else me.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]  # resolved against real modules later

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                for sub in child.orelse:
                    visit_stmt(sub, in_function)
                continue
            visit_stmt(child, in_function)

    def visit_stmt(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            (deferred if in_function else top).append(names(child))
        else:
            fn = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or fn)

    visit(tree, False)
    return top, deferred


def resolve(group: list[str], modules: set[str]) -> set[str]:
    """Targets of one import statement: `from a import b` -> a.b if a module, else a."""
    base, *members = group
    out = {m for m in members if m in modules}
    if not members or len(out) < len(members):
        # `import a.b` / `from a import name`: the deepest module that exists
        parts = base.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            out.add(".".join(parts))
    return out


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components that contain a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """One shortest cycle through `start` inside its component (breadth first)."""
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return [start]


def report(title: str, graph: dict[str, set[str]]) -> int:
    comps = sccs(graph)
    print(f"{title}: {len(comps)} cycle(s)")
    for comp in comps:
        print(f"  {len(comp)} modules: {', '.join(comp)}")
        print(f"    e.g. {' -> '.join(shortest_cycle(graph, comp[0], set(comp)))}")
    return len(comps)


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "edgellm"
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    top: dict[str, set[str]] = {m: set() for m in modules}
    every: dict[str, set[str]] = {}
    deferred: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module_level, function_level = imports(tree, mod, path.name == "__init__.py")
        for group in module_level:
            top[mod] |= resolve(group, modules) - {mod}
        for group in function_level:
            deferred[mod] |= resolve(group, modules) - {mod}
        every[mod] = top[mod] | deferred[mod]
    print(f"{len(modules)} modules under {root}; import edges between them (module -> module): "
          f"{sum(map(len, top.values()))} module-level, {sum(map(len, deferred.values()))} function-level "
          f"({sum(len(deferred[m] - top[m]) for m in modules)} of them not also module-level)")
    cycles = report("module-level imports", top)
    report("module-level + function-level imports", every)
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
