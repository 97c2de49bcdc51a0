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


@pytest.mark.parametrize("name", ["openai_api.py", "supervisor.py"])
def test_the_files_copied_into_the_container_stand_alone(name):
    """`--stage-wheels` copies them beside start.sh: no loraship import, and the supervisor needs only the stdlib."""
    import sys

    found = {module.split(".")[0] for _, module in imports(ROOT / "triton_repo" / name)}
    assert "loraship" not in found
    if name == "supervisor.py":
        assert found <= set(sys.stdlib_module_names) | {"__future__"}, found - set(sys.stdlib_module_names)
