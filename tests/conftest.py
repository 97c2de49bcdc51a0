"""Session fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def merged_dir(tmp_path_factory) -> Path:
    """A tiny phi3 demo model with its adapter merged, by the library functions the CLI calls."""
    from loraship.export.demo_model import demo_model
    from loraship.export.merge import merge

    work = tmp_path_factory.mktemp("pipeline")
    demo_model(work / "demo", arch="phi3", size="tiny")
    return merge(work / "demo" / "base", work / "demo" / "adapter", work / "merged")


@pytest.fixture(scope="session")
def onnx_dir(merged_dir, tmp_path_factory) -> Path:
    """The merged tiny model through the default export once (the genai builder's GQA graph)."""
    from loraship.export.onnx_export import export_onnx

    return export_onnx(merged_dir, tmp_path_factory.mktemp("export") / "onnx")


@pytest.fixture(scope="session")
def optimum_dir(merged_dir, tmp_path_factory) -> Path:
    """The same model through optimum's export (a decoder that returns a grown KV cache each step)."""
    from loraship.export.onnx_export import export_onnx

    return export_onnx(merged_dir, tmp_path_factory.mktemp("export") / "optimum", engine="optimum")


@pytest.fixture(scope="session")
def demo_pair(merged_dir) -> tuple[Path, Path]:
    """The base and adapter of the session's merged model (for `loraship ship`)."""
    return merged_dir.parent / "demo" / "base", merged_dir.parent / "demo" / "adapter"


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
