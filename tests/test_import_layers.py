"""The package's layers, read from its imports: no module imports a higher layer, and no import cycle exists.

Layers, lowest first (docs/architecture.md): shared helpers -> data -> peft -> models -> generation -> eval ->
training -> checkpoints -> inference -> the commands and integrations. Every ``import`` / ``from ... import`` of
``mole_lightning`` in ``src/`` counts, at module level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "mole_lightning"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("constants", "pixels", "tokenization"),
    ("data",),
    ("peft",),
    ("models",),
    ("generation",),
    ("eval",),
    ("training",),
    ("checkpoints",),
    ("inference",),
    ("chat", "cli", "convert", "export_command", "routing_report", "integrations", "__main__", "__init__"),
)
LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = module_names()


def imported_modules(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            for alias in node.names:
                full = f"{module}.{alias.name}"
                found.add(full if full in MODULES else module)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYER_OF, f"{module}: its top-level name {top!r} has no layer in tests/test_import_layers.py"
    return LAYER_OF[top]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_module_imports_a_higher_layer():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if module != "mole_lightning" and layer(target) > layer(module)
    )
    assert upward == []


def test_no_import_cycle():
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_reader_sees_imports_of_every_form():
    """The reader against imports written by hand in each form it parses."""
    assert "mole_lightning.peft.config" in GRAPH["mole_lightning.peft.inject"]  # from mole_lightning.peft.config
    assert "mole_lightning.data" in GRAPH["mole_lightning.cli"]
