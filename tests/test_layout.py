"""The layout is the pipeline, and it has no import circle.

Every import inside relay/ counts: at the top, inside functions, and those made for type
checking only (a type taken back from a module that imports you is a circle of the design).
Importing relay.a.b also runs relay/a/__init__.py, so that counts as importing it too."""

from __future__ import annotations

import ast
from pathlib import Path

RELAY = Path(__file__).resolve().parent.parent / "relay"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(RELAY.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in RELAY.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The relay modules `path` imports, anywhere in it (with the packages that implies)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if not target.startswith("relay"):
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    found.add(candidate)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_inside_relay() -> None:
    graph = import_graph()
    assert len(graph) > 40, "the graph covers the whole package"
    assert cycles(graph) == []


def test_the_checker_sees_a_cycle_made_by_an_import_inside_a_function(tmp_path: Path) -> None:
    # relay.spool is a leaf of the pipeline; were it to import the sender inside a function
    # (or for a type check), the two would form a circle.
    probe = tmp_path / "spool.py"
    probe.write_text("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from relay.events import Event\n"
                     "def f():\n    from relay.send.sender import DestinationSender\n")
    imported = _imports(probe, "relay.spool", set(_modules()))
    assert imported >= {"relay.send.sender", "relay.send", "relay.events"}
    graph = import_graph()
    graph["relay.spool"] = imported
    assert any({"relay.spool", "relay.send.sender"} <= set(c) for c in cycles(graph))


def test_the_config_model_imports_no_other_part_of_the_relay() -> None:
    """Every stage may import the model; the model imports none of them."""
    assert import_graph()["relay.config.model"] == set()


def test_each_stage_is_a_package_of_its_own() -> None:
    stages = {"receive", "edit", "route", "send", "pipeline", "toolkits", "config", "ops",
              "cli"}
    assert stages <= {p.name for p in RELAY.iterdir() if (p / "__init__.py").is_file()}
    # The top of relay/ holds only what every stage shares.
    assert {p.name for p in RELAY.glob("*.py")} == {"__init__.py", "__main__.py",
                                                    "events.py", "spool.py"}
