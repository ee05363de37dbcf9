"""The package layout: no import cycles, no layer imports a higher one, no module over 500 lines.

The import graph is read with :mod:`ast` from every module under ``src/safesteer``: module-level
and function-level imports are edges alike (a lazy import inside a function is still a
dependency, and the old ``cli`` ↔ ``cli_safeswitch`` circle was made of them). Imports under
``if TYPE_CHECKING:`` are left out: they never run and only name types.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "safesteer"

# Lowest first; a module may import its own layer and lower ones, never a higher one. A module
# belongs to the layer of the longest prefix that matches its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("package", ("safesteer",)),  # the package root: only __version__
    ("core", ("safesteer.core",)),
    ("datasets", ("safesteer.datasets",)),
    # Judges and metrics score texts (no model); methods label training data with them and the
    # organism build checks refusal rates, so they sit below models and methods.
    ("scoring", ("safesteer.evaluation.judges", "safesteer.evaluation.metrics")),
    ("models", ("safesteer.models",)),
    ("methods", ("safesteer.methods",)),
    ("evaluation", ("safesteer.evaluation",)),
    ("serving", ("safesteer.serving",)),
    ("cli", ("safesteer.cli", "safesteer.__main__")),
]
MAX_LINES = 500
# Modules allowed over MAX_LINES, each with its reason. Keep empty if at all possible.
LINE_ALLOWLIST: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.iter_child_nodes(node):
        if _type_checking_only(child):
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _imports(child)


def _resolve(name: str, known: dict[str, Path], importer: str, level: int) -> str:
    if level:
        base = importer.split(".")
        if known[importer].name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (level - 1)]
        name = ".".join([*base, name] if name else base)
    return name


def import_graph() -> dict[str, set[str]]:
    """Module → the safesteer modules it imports (``from pkg import mod`` names the module)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(node.module or "", known, name, node.level)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target.startswith("safesteer") and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a chain ``a → b → … → a``, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in modules() if layer_of(name) < 0]
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_no_layer_imports_a_higher_one() -> None:
    graph = import_graph()
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                bad.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports "
                    f"{target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not bad, (
        "layer order " + " < ".join(n for n, _ in LAYERS) + " broken:\n" + "\n".join(bad)
    )


def test_core_imports_only_core() -> None:
    graph = import_graph()
    bad = {
        module: sorted(t for t in targets if not t.startswith("safesteer.core"))
        for module, targets in graph.items()
        if module.startswith("safesteer.core")
    }
    bad = {module: targets for module, targets in bad.items() if targets}
    assert not bad, f"core modules import outside core: {bad}"


def test_modules_are_short() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
        and name not in LINE_ALLOWLIST
    }
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_find_cycle(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected


def test_function_level_imports_are_edges() -> None:
    graph = import_graph()
    # cli.run imports the run job inside its command function only
    assert "safesteer.evaluation.runner" in graph["safesteer.cli.run"]
