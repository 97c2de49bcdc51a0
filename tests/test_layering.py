"""The package's import rules, read from the source with `ast` (imports inside functions included):
the serving side never depends on the torch side, the engine stands alone (it is copied into every
Triton model version), and no library module imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core", "cli", "export", "engine", "triton_repo", "client", "infra"}  # pyproject maps each into `loraship`
# folder -> packages none of its modules may import
FORBIDDEN = {
    "triton_repo": ("loraship.export", "loraship.client", "loraship.cli"),
    "engine": ("loraship",),  # relative imports only: it runs as `loraship_engine` inside Triton
    "export": ("loraship.cli",),
    "client": ("loraship.cli", "loraship.export"),
    "infra": ("loraship.cli", "loraship.export"),
    "core": ("loraship.cli",),
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


def violations(folder: str) -> list[str]:
    banned = FORBIDDEN[folder]
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imports(path):
            hit = next((b for b in banned if module == b or module.startswith(b + ".")), None)
            if hit:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_rules(folder):
    assert violations(folder) == []


def test_the_checker_sees_lazy_imports(tmp_path):
    """The rule is not vacuous: an import inside a function is found, a relative one is not mistaken for absolute."""
    src = tmp_path / "m.py"
    src.write_text("from .x import y\n\ndef f():\n    from loraship.export.merge import merge\n    import loraship.client.client\n")
    assert imports(src) == [(4, "loraship.export.merge"), (4, "loraship.export.merge.merge"), (5, "loraship.client.client")]
    assert PACKAGES == {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}  # every package folder is known


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
