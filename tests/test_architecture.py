"""The layering of docs/architecture.md, checked from the source: imports run one way, no cycles.

Every import statement counts, including those inside functions and under TYPE_CHECKING: a
deferred import still ties the modules together.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "anomalens"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _layer_table() -> list[list[str]]:
    """The layer order as docs/architecture.md writes it: one line '`N` | packages' per layer."""
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", ARCHITECTURE.read_text(), flags=re.M)
    assert rows, "docs/architecture.md lost its layer table"
    return [re.findall(r"`([\w.]+)`", packages) for _, packages in sorted(rows, key=lambda r: int(r[0]))]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["anomalens", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that `name` imports (a name imported from a package counts as the
    submodule when there is one, else as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _layer_of(module: str, layers: list[list[str]]) -> int | None:
    best = None
    for i, packages in enumerate(layers):
        for p in packages:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return None if best is None else best[0]


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}
LAYERS = _layer_table()


def test_every_module_has_a_layer():
    # the package itself is the public API on top: it may import anything, nothing imports it
    missing = sorted(m for m in MODULES if m != "anomalens" and _layer_of(m, LAYERS) is None)
    assert not missing, f"modules outside every layer of docs/architecture.md: {missing}"


def test_nothing_imports_the_api_package():
    users = sorted(m for m, deps in GRAPH.items() if "anomalens" in deps)
    assert not users, f"import the module you need, not the API package: {users}"


def test_imports_never_go_up_a_layer():
    upward = []
    for module, deps in GRAPH.items():
        if module == "anomalens":
            continue
        own = _layer_of(module, LAYERS)
        upward += [
            f"{module} (layer {own}) -> {d} (layer {_layer_of(d, LAYERS)})"
            for d in sorted(deps)
            if _layer_of(d, LAYERS) > own
        ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from anomalens.models import base", {"anomalens.models.base"}),
        ("from anomalens.data import read_image", {"anomalens.data"}),
        ("from ..data.io import read_image", {"anomalens.data.io"}),
    ],
)
def test_import_reader(source, expected, tmp_path):
    # the checker itself must see each import form, or the tests above would pass on anything
    path = PACKAGE / "workflows" / "probe.py"
    fake = tmp_path / "probe.py"
    fake.write_text(source)
    modules = {**MODULES, "anomalens.workflows.probe": path}
    assert _imports("anomalens.workflows.probe", fake, modules) == expected
