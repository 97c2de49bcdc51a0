"""Session fixtures shared by every test folder.

``merged_dir``, ``onnx_dir`` and ``optimum_dir``: a random-init tiny phi3 through merge and
export, for tests that need only shapes and parity (instant to build). ``trained``: the trained demo fine-tune (``loraship demo-model``,
about 1.5 minutes on 2 idle cores), merged, with its exports built on first use, for tests where what the model
learned matters, and ``trained_roman``: a second adapter on its base (Roman numerals). ``lora_worlds``: per architecture, a tiny random base with four adapters, each adapter's
merged export, and the base exported with LoRA slots (issue 19), built on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # testkit: the helpers every folder shares (importlib import mode)

from testkit import SHORT_CONTEXT  # noqa: E402

TRAINED_EXPORTS = {  # name -> export_onnx keyword arguments
    "fp32": {},  # the default export: the genai builder's fp32 GQA graph
    "fp16": {"dtype": "fp16"},  # on the CPU, fp16 takes optimum
    "int4": {"int4": True},  # the genai builder's MatMulNBits weights
}


@pytest.fixture(scope="session", autouse=True)
def temp_files_under_basetemp(tmp_path_factory):
    """Temporary files of the session (tritonserver's and the frontend's logs, ``tempfile`` in this process
    and ``TMPDIR`` in the processes it starts) go under pytest's base temp, which pytest prunes, not /tmp."""
    temp = tmp_path_factory.mktemp("tmp")
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(temp), str(temp)
    yield temp
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[1]


@pytest.fixture(scope="session")
def merged_dir(tmp_path_factory) -> Path:
    """A tiny random-init phi3 demo model with its adapter merged, by the library functions the CLI calls."""
    from loraship.export.demo_model import demo_model
    from loraship.export.merge import merge

    work = tmp_path_factory.mktemp("pipeline")
    demo_model(work / "demo", arch="phi3", size="tiny", random=True)
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
def engine(onnx_dir):
    """The in-process engine on the session's tiny export (the default export, default options): the one that
    every folder's servers serve, for references and greedy comparisons."""
    from loraship.engine import Engine

    return Engine.load(onnx_dir)


@pytest.fixture(scope="session")
def rows_engine(onnx_dir):
    """The same export with four KV rows, for in-flight batching tests that fill and reuse rows."""
    from loraship.engine import Engine

    engine = Engine.load(onnx_dir, max_batch=4)
    assert engine.manifest.engine == "genai" and engine.kv is not None  # the default export: KV rows
    return engine


EOS_PROMPTS = ("The quick brown fox", "Hello, how are you today?", "Numbers: 0 1 2 3", "Explain what a transformer is")


@dataclass(frozen=True)
class EosExport:
    """An export whose greedy continuation of ``prompt`` emits EOS as generated token ``steps + 1``."""

    path: Path
    prompt: str
    eos: int
    steps: int  # tokens before the EOS


@pytest.fixture(scope="session")
def eos_export(onnx_dir, engine, tmp_path_factory) -> EosExport:
    """The tiny export with one more EOS id in its manifest: a token its greedy path first emits a few
    steps into a prompt's continuation. The random-weight demo model rarely samples its real EOS; this
    gives a model that does, on the real ONNX Runtime path, whatever weights the demo model has."""
    from loraship.engine import SamplingParams

    for prompt in EOS_PROMPTS:
        [done] = engine.generate([prompt], SamplingParams(max_tokens=12))
        path = done.token_ids
        steps = next((i for i in range(3, len(path)) if path[i] not in path[:i] and path[i] not in engine.eos_ids), None)
        if steps is not None:
            break
    else:
        pytest.fail("no greedy continuation of the test prompts emits a new token after step 3")
    out = tmp_path_factory.mktemp("eos") / "onnx"
    shutil.copytree(onnx_dir, out)
    manifest = json.loads((out / "loraship.json").read_text())
    manifest["eos_token_ids"] = sorted(set(manifest.get("eos_token_ids") or []) | {path[steps]})
    (out / "loraship.json").write_text(json.dumps(manifest, indent=2))
    return EosExport(out, prompt, path[steps], steps)


@pytest.fixture(scope="session")
def eos_engine(eos_export):
    from loraship.engine import Engine

    return Engine.load(eos_export.path)


@pytest.fixture(scope="session")
def plain_triton(onnx_dir, eos_export, tmp_path_factory):
    """A real tritonserver (nvidia-pytriton's binary, no API key) for tests/serving and tests/sampling: the tiny
    export as ``tiny``, its EOS copy as ``tiny-eos``, and the tiny export capped to a context of
    :data:`SHORT_CONTEXT` tokens as ``tiny-short``. One launch for both folders; at the end it checks that
    tritonserver left no /dev/shm region behind."""
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    repo = tmp_path_factory.mktemp("plain-triton") / "repo"
    write_version(onnx_dir, repo, ModelOptions(name="tiny", max_batch_size=8, threads=2))
    write_version(eos_export.path, repo, ModelOptions(name="tiny-eos", max_batch_size=8, threads=1))
    write_version(onnx_dir, repo, ModelOptions(name="tiny-short", max_batch_size=2, threads=1, max_context=SHORT_CONTEXT))
    server = TritonServer(repo, ready_timeout=120)
    with server:
        yield server
    assert not server.shm_regions(), "tritonserver left shared-memory regions behind"


@pytest.fixture(scope="session")
def demo_pair(merged_dir) -> tuple[Path, Path]:
    """The base and adapter of the session's merged model (for `loraship ship`)."""
    return merged_dir.parent / "demo" / "base", merged_dir.parent / "demo" / "adapter"


@dataclass
class Trained:
    """The trained tiny phi3 demo: ``demo`` (demo-model output), ``merged``, and exports on demand."""

    root: Path
    demo: Path
    merged: Path
    _exports: dict[str, Path] = field(default_factory=dict)

    def export(self, name: str) -> Path:
        """The ``fp32`` (default: genai builder), ``fp16`` (optimum) or ``int4`` (genai builder) export, built once."""
        from loraship.export.onnx_export import export_onnx

        if name not in self._exports:
            self._exports[name] = export_onnx(self.merged, self.root / f"onnx-{name}", **TRAINED_EXPORTS[name])
        return self._exports[name]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    """``loraship demo-model`` (trained, seed 0) and ``loraship merge``, run once per test session."""
    from loraship.export.demo_model import demo_model
    from loraship.export.merge import merge

    root = tmp_path_factory.mktemp("trained")
    demo = demo_model(root / "demo", arch="phi3", size="tiny", seed=0)
    return Trained(root, demo, merge(demo / "base", demo / "adapter", root / "merged"))


@pytest.fixture(scope="session")
def trained_roman(trained) -> Path:
    """`loraship demo-model --base DEMO/base --second-task roman`: the second adapter (numbers in Roman numerals)
    fine-tuned on the ``trained`` demo's base, once per session (the fine-tune only: about 30 s on 2 idle cores)."""
    from loraship.export.demo_task import task_adapter

    return task_adapter(trained.demo / "base", trained.root / "adapter-roman", "roman", seed=0)


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


LORA_RANK = 8  # the slot rank of the LoRA worlds: the demo adapter's rank, the largest there
# adapters 2-4 beside the demo's (rank 8 on every projection): other ranks, targets and scalings
LORA_EXTRA = {
    "phi3": [(["qkv_proj"], 4, {}), (["o_proj", "down_proj"], 8, {"use_rslora": True}),
             (["gate_up_proj"], 2, {"lora_alpha": 7})],
    "llama": [(["q_proj", "v_proj"], 4, {}), (["k_proj", "o_proj", "down_proj"], 8, {"use_rslora": True}),
              (["gate_proj", "up_proj"], 6, {"rank_pattern": {"up_proj": 2}, "alpha_pattern": {"gate_proj": 3}})],
}


@dataclass
class LoraWorld:
    """One tiny random base, four adapters, each adapter's merged export, the base's default export, the
    base with 4 LoRA slots of rank :data:`LORA_RANK` in each design, and the adapters converted for them."""

    root: Path
    arch: str
    base: Path
    base_onnx: Path
    adapters: list[Path]
    merged: list[Path]
    slots: dict[str, Path] = field(default_factory=dict)
    converted: list[Path] = field(default_factory=list)


def build_lora_world(root: Path, arch: str) -> LoraWorld:
    from loraship.export.demo_model import demo_model, random_adapter
    from loraship.export.lora_convert import convert_adapter
    from loraship.export.lora_slots import add_lora_slots
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx

    demo = demo_model(root / "demo", arch=arch, size="tiny", random=True)
    adapters = [demo / "adapter"] + [random_adapter(demo / "base", root / f"adapter-{i}", targets, rank, seed=10 + i, **opts)
                                     for i, (targets, rank, opts) in enumerate(LORA_EXTRA[arch], start=2)]
    merged = [export_onnx(merge(demo / "base", a, root / f"merged-{i}"), root / f"merged-{i}-onnx") for i, a in enumerate(adapters)]
    world = LoraWorld(root, arch, demo / "base", export_onnx(demo / "base", root / "base-onnx"), adapters, merged)
    for design in ("gather", "masked"):
        world.slots[design] = add_lora_slots(world.base_onnx, root / f"slots-{design}", max_adapters=4, max_rank=LORA_RANK,
                                             design=design)
    world.converted = [convert_adapter(a, world.slots["gather"], root / f"converted-{i}") for i, a in enumerate(adapters)]
    return world


@pytest.fixture(scope="session")
def lora_worlds(tmp_path_factory):
    """``lora_worlds(arch)``: the :class:`LoraWorld` of ``arch`` (phi3 or llama), built on first use."""
    worlds: dict[str, LoraWorld] = {}

    def get(arch: str) -> LoraWorld:
        if arch not in worlds:
            worlds[arch] = build_lora_world(tmp_path_factory.mktemp(f"slots-{arch}"), arch)
        return worlds[arch]

    return get
