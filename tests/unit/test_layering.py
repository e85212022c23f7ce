"""The layering docs/ARCHITECTURE.md states holds: arrows point down, no cycles, sizes bound."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "clusterd"
# What each layer may import of clusterd (docs/ARCHITECTURE.md, "The parts").
ALLOWED = {
    "tasks": {"tasks"},
    "core": {"core", "tasks"},
    "client": {"client", "core", "tasks"},
}
FORBIDDEN_IN_CORE = ("twisted.internet.reactor", "twisted.internet.threads", "threading", "socket")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_each_layer_imports_only_the_layers_below_it():
    """tasks imports nothing else of clusterd, core only tasks, the clients only core and
    tasks; core imports no reactor, thread or socket."""
    for name, path in _modules().items():
        parts = name.split(".")
        layer = parts[1] if len(parts) > 1 else ""
        imports = _imports(path)
        if layer in ALLOWED:
            for imp in imports:
                if imp.startswith("clusterd."):
                    target = imp.split(".")[1]
                    if target in {"core", "tasks", "client", "server", "worker"}:
                        assert target in ALLOWED[layer], f"{name} imports {imp}"
        if layer == "core":
            bad = [i for i in imports if i.startswith(FORBIDDEN_IN_CORE)]
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycles_between_modules():
    """No module of clusterd reaches itself through its imports (top-level or not)."""
    modules = _modules()
    imports = {name: _imports(path) for name, path in modules.items()}
    graph = {name: {m for m in modules if m != name and m in imports[name]} for name in modules}
    # A package's __init__ re-exporting its own modules is not a cycle of behaviour.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_every_module_and_function_stays_small():
    """Every module of clusterd is under 400 lines and every function under 60."""
    for name, path in _modules().items():
        text = path.read_text()
        assert text.count("\n") < 400, f"{name} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length < 60, f"{name}.{node.name} has {length} lines"
