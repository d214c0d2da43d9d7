"""The rfs module import graph: `python tools/imports.py` prints it and exits 1 when it has a cycle,
or when a function imports an rfs module that could be imported at the top.

Edges are every import of an rfs module, at the top of a module or inside a function; importing
rfs.a.b also imports the package rfs.a (unless the importer is inside it). A function-level import
is allowed only for a heavy module: one that imports an optional heavy dependency (HEAVY) at its
top level, itself or through the rfs modules it imports there. Importing it lazily keeps every
other command working without that dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "peft", "textual", "asyncssh", "matplotlib"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted((ROOT / "rfs").rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """The modules an import statement names: `from rfs.x import y` names rfs.x.y when that is a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def scan(tree: ast.Module, known: set[str]) -> tuple[set[str], set[str], set[str]]:
    """(rfs modules imported at the top, rfs modules imported in functions, heavy packages imported at the top)."""
    top, lazy, heavy = set(), set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in imported(child, known):
                    if name.split(".")[0] == "rfs":
                        (lazy if in_function else top).add(name)
                    elif name.split(".")[0] in HEAVY and not in_function:
                        heavy.add(name.split(".")[0])
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, lazy, heavy


def with_packages(importer: str, names: set[str]) -> set[str]:
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts)) if not importer.startswith(".".join(parts[:i]))}
        out.add(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def analyse() -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(graph, a cycle or [], function-level imports that are not allowed)."""
    trees = modules()
    known = set(trees)
    scanned = {m: scan(t, known) for m, t in trees.items()}
    heavy = {m for m, (_, _, h) in scanned.items() if h}
    while grown := {m for m, (top, _, _) in scanned.items() if m not in heavy and with_packages(m, top) & heavy}:
        heavy |= grown
    graph, lazy_ok = {}, []
    for m, (top, lazy, _) in scanned.items():
        graph[m] = with_packages(m, top | lazy) & known
        lazy_ok += [f"{m} imports {n} in a function" for n in sorted(lazy - heavy)]
    return graph, find_cycle(graph), lazy_ok


def main() -> int:
    graph, cycle, lazy = analyse()
    for m in sorted(graph):
        print(f"{m} -> {', '.join(sorted(graph[m])) or '(nothing)'}")
    if cycle:
        print("cycle: " + " -> ".join(cycle))
    for line in lazy:
        print(f"not heavy, import it at the top: {line}")
    return 1 if cycle or lazy else 0


if __name__ == "__main__":
    sys.exit(main())
