"""Session fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    """A tiny phi3 demo model taken through merge and export once, by the library functions the CLI calls."""
    from loraship.export.demo_model import demo_model
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx

    work = tmp_path_factory.mktemp("pipeline")
    demo_model(work / "demo", arch="phi3", size="tiny")
    merge(work / "demo" / "base", work / "demo" / "adapter", work / "merged")
    export_onnx(work / "merged", work / "onnx")
    return work / "onnx"


@pytest.fixture(scope="session")
def demo_pair(onnx_dir) -> tuple[Path, Path]:
    """The base and adapter the session export was merged from (for `loraship ship`)."""
    return onnx_dir.parent / "demo" / "base", onnx_dir.parent / "demo" / "adapter"


@pytest.fixture
def run_cli(capsys):
    """Run the `loraship` entry point in-process; return (exit code, stdout, stderr)."""
    from loraship.cli.main import main

    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
