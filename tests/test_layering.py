"""The package's import rules, read from the source with `ast` (imports inside functions and under
``TYPE_CHECKING`` included), for files and for folders: the folders form no cycle, with core/ at the
bottom and the pipeline at the top (only the CLI imports it); the serving side never depends on the
torch side; the engine stands alone (it is copied into every Triton model version); no library module
imports the CLI; benchmarks import the library as modules."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_folders() -> dict[str, str]:
    """pyproject's package -> folder mapping (``loraship`` -> ``core``, ``loraship.cli`` -> ``cli``, ...)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^"(loraship[\w.]*)" = "(\w+)"', section, re.M))


PACKAGES = package_folders()
FOLDERS = sorted(PACKAGES.values())
LIBRARY = [f for f in FOLDERS if f != "cli"]
NOT_PACKAGES = {"benchmarks"}  # folders with an __init__.py outside `loraship`: run as `python -m benchmarks.NAME`
# folder -> packages none of its modules may import
FORBIDDEN = {
    "triton_repo": ("loraship.export", "loraship.client"),
    "engine": ("loraship",),  # relative imports only: it runs as `loraship_engine` inside Triton
    "client": ("loraship.export",),
    "infra": ("loraship.export",),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def eager_imports(path: Path) -> list[tuple[int, str]]:
    """The imports that run when the module is imported: not inside a function, nor under ``if TYPE_CHECKING``."""
    found: list[tuple[int, str]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.lineno, node.module))
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for part in (getattr(node, "handlers", []), getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    for item in part:
                        visit(item.body if isinstance(item, ast.ExceptHandler) else [item])
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(ast.parse(path.read_text(), str(path)).body)
    return found


def folder_of(module: str) -> str | None:
    """The folder a ``loraship.*`` module lives in (its longest mapped package), None outside loraship."""
    package = max((p for p in PACKAGES if module == p or module.startswith(p + ".")), key=len, default=None)
    return PACKAGES.get(package) if package else None


@functools.cache
def folder_graph() -> dict[str, dict[str, list[str]]]:
    """folder -> {imported folder -> ['file:line', ...]} over every module of every folder."""
    graph: dict[str, dict[str, list[str]]] = {f: {} for f in FOLDERS}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in imports(path):
                target = folder_of(module)
                if target and target != folder:
                    graph[folder].setdefault(target, []).append(f"{path.relative_to(ROOT)}:{line}")
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph ``edges`` as a list of nodes (first == last), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def violations(folder: str, banned: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imports(path):
            hit = next((b for b in banned if module == b or module.startswith(b + ".")), None)
            if hit:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_rules(folder):
    assert violations(folder, FORBIDDEN[folder]) == []


def test_no_folder_cycle():
    graph = folder_graph()
    cycle = find_cycle({f: set(targets) for f, targets in graph.items()})
    assert cycle is None, " -> ".join(cycle or []) + "; " + "; ".join(
        f"{a} -> {b} at {graph[a][b][0]}" for a, b in zip(cycle or [], (cycle or [])[1:]))


def test_core_is_the_bottom_layer():
    """core/ (version, errors, fsutil, endpoint) imports no other folder, so every folder may import it."""
    assert folder_graph()["core"] == {}


@pytest.mark.parametrize("folder", LIBRARY)
def test_no_library_folder_imports_the_cli(folder):
    assert "cli" not in folder_graph()[folder], folder_graph()[folder].get("cli")


def test_only_the_cli_imports_the_pipeline():
    graph = folder_graph()
    assert {f for f, targets in graph.items() if "pipeline" in targets} <= {"cli"}


def test_the_pipeline_imports_the_layers_lazily():
    """At import time the pipeline loads only core and itself; the layers load inside the steps that use them."""
    eager = [f"{path.relative_to(ROOT)}:{line} {module}" for path in sorted((ROOT / "pipeline").rglob("*.py"))
             for line, module in eager_imports(path) if folder_of(module) not in (None, "core", "pipeline")]
    assert eager == []


def test_benchmarks_import_the_library_as_modules():
    """Benchmarks run as `python -m benchmarks.NAME` and import each other as ``benchmarks.NAME``: no sys.path edits."""
    edits = [f"{path.name}:{node.lineno}" for path in sorted((ROOT / "benchmarks").glob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute) and node.attr == "path"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert edits == []
    assert (ROOT / "benchmarks" / "__init__.py").is_file()


def test_the_checkers_are_not_vacuous(tmp_path):
    """An import inside a function is found, a relative one is not mistaken for absolute, TYPE_CHECKING and
    function-level imports are not eager, a cycle is found, and every package folder is known."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom .x import y\nif TYPE_CHECKING:\n    import loraship.infra\n\n"
                   "def f():\n    from loraship.export.merge import merge\n    import loraship.client.client\n")
    assert imports(src) == [(1, "typing"), (1, "typing.TYPE_CHECKING"), (4, "loraship.infra"), (7, "loraship.export.merge"),
                            (7, "loraship.export.merge.merge"), (8, "loraship.client.client")]
    assert eager_imports(src) == [(1, "typing")]
    assert folder_of("loraship.errors") == "core" and folder_of("loraship.pipeline.ship") == "pipeline"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    packaged = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packaged == set(FOLDERS) | NOT_PACKAGES  # every package folder is known


# What runs apart from loraship, copied whole: the container's runtime (supervisor and frontend, into wheels/
# as loraship_runtime) and each model version's files (beside loraship_engine) -> the top-level modules it may
# import besides the stdlib. The contract they share imports nothing.
FRONTEND_DEPS = {"fastapi", "pydantic", "httpx", "uvicorn", "starlette"}
STANDALONE = {
    "triton_repo/runtime": {"loraship_contract"} | FRONTEND_DEPS,
    "triton_repo/model_template": {"loraship_contract", "loraship_engine", "loraship_inputs", "numpy", "triton_python_backend_utils"},
}
STDLIB_ONLY = ("triton_repo/runtime/__init__.py", "triton_repo/runtime/processes.py", "triton_repo/runtime/supervisor.py")


def relative_imports(path: Path) -> list[str]:
    """The sibling modules a file imports relatively (``from .x import y``: x)."""
    return [node.module or "" for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.ImportFrom) and node.level == 1]


@pytest.mark.parametrize("folder", sorted(STANDALONE))
def test_the_folders_copied_out_of_loraship_stand_alone(folder):
    """`--stage-wheels` copies the runtime into the container and `repo` the model's files into each version:
    no loraship import anywhere in them, only the stdlib, their own dependencies and the contract."""
    import sys

    allowed = set(sys.stdlib_module_names) | {"__future__"} | STANDALONE[folder]
    files = sorted((ROOT / folder).rglob("*.py"))
    found = {f"{path.relative_to(ROOT)}: {module}" for path in files for _, module in imports(path) if module.split(".")[0] not in allowed}
    assert len(files) > 1 and found == set()


@pytest.mark.parametrize("name", STDLIB_ONLY)
def test_the_supervisor_needs_only_the_stdlib(name):
    """The supervisor (what start.sh runs) and what it imports need no package but the contract."""
    import sys

    found = {module.split(".")[0] for _, module in imports(ROOT / name)}
    assert "loraship" not in found
    assert found <= set(sys.stdlib_module_names) | {"__future__", "loraship_contract"}, found - set(sys.stdlib_module_names)
    assert {f"triton_repo/runtime/{module.split('.')[0]}.py" for module in relative_imports(ROOT / name)} <= set(STDLIB_ONLY)


def test_the_contract_imports_nothing():
    """It is copied beside every part that runs apart from loraship, so it can need nothing."""
    assert imports(ROOT / "contract" / "loraship_contract.py") == []
