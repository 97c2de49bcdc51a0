"""Export a merged model folder to a self-contained ONNX decoder folder with KV cache.

Engine ``genai``: the onnxruntime-genai model builder (GroupQueryAttention, fp32/fp16, or int4 MatMulNBits
weights), built for the CPU or, with ``target="cuda"``, for the CUDA provider (fp16 GQA kernels; the
result still runs on the CPU provider, so it is checked here). The engine decodes it in place from KV
rows planned at load, all active requests in one run per step. Engine ``optimum``: optimum-onnx
``text-generation-with-past``, one decoder taking ``past_key_values.*`` and returning ``present.*``. fp16
is exported from the fp16 PyTorch model on the CPU (the export traces the model; no CUDA is needed), so
its KV cache and logits are float16.

``engine="auto"`` is chosen by what is correct, not by a list: it builds with the genai builder where
the installed builder lists the architecture (``genai_builder``), probes the build against PyTorch at
once (``verify.probe``: a short prompt and one past the model's sliding window or rope threshold), and
falls back to optimum, with one line saying why, when the builder fails or the probe does. When no
engine passes, export refuses in one line naming the architecture and each engine's reason. A forced
``--engine`` is probed too, and refused when it fails. Builds happen in the output's temporary sibling,
which is renamed into place only after a probe passed: an export known to be wrong is never written.

The folder holds ``model.onnx`` (+ external data), ``tokenizer.json`` and its configs,
``config.json``, ``generation_config.json``, when the model folder has one its ``eval.jsonl``
(see evalset.py), and ``loraship.json`` (see manifest.py), written last with the size and sha256
of every other file.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

from rich.console import Console

from loraship.engine.integrity import write_checksummed
from loraship.errors import LorashipError
from loraship.export import genai_builder, hfcompat
from loraship.export.evalset import copy_eval, eval_source
from loraship.export.genai_builder import BuildError
from loraship.export.manifest import build_manifest, kv_cache_facts
from loraship.export.progress import Stages
from loraship.fsutil import atomic_dir, check_out_dir

ENGINES = ("auto", "genai", "optimum")
DTYPES = ("fp32", "fp16")
TARGETS = ("cpu", "cuda")
TASK = "text-generation-with-past"
_REPORT_FIX = "export with --engine auto, which picks an engine that passes, or report the architecture to loraship"


def export_onnx(
    model: Path,
    out: Path,
    dtype: str = "fp32",
    engine: str = "auto",
    int4: bool = False,
    target: str = "cpu",
    force: bool = False,
    console: Console | None = None,
) -> Path:
    """Export the merged model in ``model`` to ``out``; return ``out``.

    ``engine="auto"`` tries the engines of :func:`candidates` in order and keeps the first whose build
    passes the parity probe.
    """
    model, out = Path(model), Path(out)
    if engine not in ENGINES:
        raise LorashipError(f"unknown --engine {engine!r}", f"choose one of {', '.join(ENGINES)}")
    if dtype not in DTYPES:
        raise LorashipError(f"unknown --dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if target not in TARGETS:
        raise LorashipError(f"unknown --target {target!r}", f"choose one of {', '.join(TARGETS)}")
    if not model.is_dir():
        raise LorashipError(f"model folder not found: {model}", "pass --model the folder written by `loraship merge`")
    raw = hfcompat.read_json(model / "config.json", "model config", "pass --model the folder written by `loraship merge`")
    config = hfcompat.standard_config(raw)
    if "model_type" not in config:
        raise LorashipError(f"{model}/config.json is not a causal LM config", "pass --model the folder written by `loraship merge`")
    if "max_position_embeddings" not in config:  # Bloom's configs (ALiBi) name none
        raise LorashipError(f"{model}/config.json names no context length for {config['model_type']}",
                            "add \"max_position_embeddings\": the context the model was trained for, to config.json")
    stage = Stages(console)
    engines, skipped = candidates(config, engine, dtype, int4, target)
    if engine == "auto" and engines == ["optimum"]:
        stage.note(f"{skipped[0]}; exporting with optimum, one graph for every provider (pass --engine to choose)")
    check_out_dir(out, force)
    evalset = eval_source(None, model)
    precision = "int4" if int4 else dtype
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="loraship-export-") as work:
        view = hfcompat.compat_view(model, Path(work) / "model")
        with atomic_dir(out, force=force) as tmp:
            for i, name in enumerate(engines):
                _empty(tmp)
                why = _build(name, view, tmp, precision, target, Path(work), config, stage)
                if why is None:
                    with stage(f"writing tokenizer, configs and loraship.json ({name}, with every file's sha256)"):
                        tokenizer, generation = _write_side_files(view, tmp)
                        copy_eval(evalset, tmp)
                        write_checksummed(tmp, build_manifest(name, precision, hfcompat.standard_config(hfcompat.translate_config(raw)),
                                                              generation, tokenizer, kv_cache_facts(tmp / "model.onnx")))
                    why = _probe(tmp, view, name, stage)
                if why is None:
                    break
                failures.append(f"{_ENGINE_NAMES[name]} {why}")
                if engine != "auto":
                    raise LorashipError(f"the {_ENGINE_NAMES[name]} export of {_architecture(config)} {why}", _REPORT_FIX)
                if i + 1 < len(engines):
                    stage.note(f"the {_ENGINE_NAMES[name]} export of {_architecture(config)} {why}; exporting with "
                               f"{_ENGINE_NAMES[engines[i + 1]]}")
            else:
                raise LorashipError(f"{_architecture(config)} cannot be exported correctly: {'; '.join(failures + skipped)}",
                                    "no engine here exports it right; see README \"Supported architectures\"")
    return out


_ENGINE_NAMES = {"genai": "onnxruntime-genai", "optimum": "optimum"}


def _architecture(config: dict) -> str:
    return (config.get("architectures") or [config["model_type"]])[0]


def _builder_cpu_fp16(dtype: str, int4: bool, target: str) -> bool:
    """The builder's fp16 graph for the CPU (MultiHeadAttention with repeat_kv) fails in ONNX Runtime 1.32's
    memory planner, under og.Generator too; its fp32, int4 and CUDA fp16 graphs (GroupQueryAttention) run."""
    return dtype == "fp16" and not int4 and target == "cpu"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def optimum_supports(model_type: str) -> bool:
    """Whether optimum-onnx has an ONNX config for ``model_type`` with KV cache."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs
    from optimum.exporters.tasks import TasksManager

    try:
        return TASK in TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx", library_name="transformers")
    except KeyError:
        return False


def candidates(config: dict, engine: str = "auto", dtype: str = "fp32", int4: bool = False,
               target: str = "cpu") -> tuple[list[str], list[str]]:
    """The engines ``export`` tries, in order, and one line for each engine left out and why.

    A forced engine that cannot run the request at all is refused here, before anything is built."""
    arch, model_type = _architecture(config), config["model_type"]
    builder = genai_builder.builds(arch)
    optimum = optimum_supports(model_type)
    no_builder = f"onnxruntime-genai's builder does not build {arch}"
    no_optimum = f"optimum-onnx has no ONNX export for {model_type}"
    if int4 and engine == "optimum":
        raise LorashipError("--int4 needs the onnxruntime-genai builder", "add --engine genai")
    if target != "cpu" and engine == "optimum":
        raise LorashipError("--target applies to the onnxruntime-genai builder (the optimum export runs on every provider)",
                            "add --engine genai, or drop --target")
    cpu_fp16 = _builder_cpu_fp16(dtype, int4, target)
    if engine == "genai":
        if not builder:
            raise LorashipError(no_builder, "export with --engine auto or --engine optimum")
        if cpu_fp16:
            raise LorashipError(f"the onnxruntime-genai builder's CPU fp16 graph does not run on ONNX Runtime {_ort_version()}",
                                "export fp16 for the GPU with --target cuda, or for the CPU with --engine optimum")
        return ["genai"], []
    if engine == "optimum":
        if not optimum:
            raise LorashipError(no_optimum, "export with --engine auto or --engine genai")
        return ["optimum"], []
    if int4:
        if not builder:
            raise LorashipError(f"--int4 needs the onnxruntime-genai builder, and {no_builder}", "export fp32 or fp16")
        return ["genai"], []
    engines, skipped = [], []
    if builder and not cpu_fp16:
        engines.append("genai")
    else:
        skipped.append("the onnxruntime-genai builder's fp16 graph runs only on CUDA (--target cuda)" if builder else no_builder)
    if optimum:
        engines.append("optimum")
    else:
        skipped.append(no_optimum)
    if not engines:
        raise LorashipError(f"{arch} cannot be exported: {'; '.join(skipped)}",
                            "no engine here exports it; see README \"Supported architectures\"")
    return engines, skipped


def _empty(folder: Path) -> None:
    for item in folder.iterdir():
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def _build(name: str, view: Path, out: Path, precision: str, target: str, work: Path, config: dict,
           stage: Stages) -> str | None:
    """Build with engine ``name`` into ``out``; None, or why it could not."""
    try:
        if name == "optimum":
            with stage(f"exporting {config['model_type']} to ONNX ({TASK}, {precision}) with optimum"):
                _export_optimum(view, out, precision)
        else:
            with stage(f"building {config['model_type']} ONNX ({precision}, {target}) with onnxruntime-genai"):
                genai_builder.build(view, out, precision, target, work)
    except BuildError as exc:
        return f"fails to build ({exc})"
    return None


def _probe(out: Path, view: Path, name: str, stage: Stages) -> str | None:
    """Probe the export in ``out`` against PyTorch; None when it passed (or cannot be judged, with a note)."""
    from loraship.export.verify import probe

    try:
        with stage(f"probing the {_ENGINE_NAMES[name]} export against PyTorch (eager fp32)"):
            report = probe(out, view)
    except LorashipError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime refusing the graph is the probe failing
        return f"does not run ({type(exc).__name__}: {_first_line(exc)})"
    if report.passed:
        return None
    if not report.judged:
        stage.note(f"int4 parity not probed: {report.failure}; judge it with `loraship verify --base BASE` or --eval")
        return None
    return f"fails the parity probe: {report.failure}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text[:300]


def _export_optimum(model_dir: Path, out: Path, dtype: str) -> None:
    """optimum's export, tracing eager attention (the reference math: sdpa drops soft-capping and sinks)."""
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers.utils import logging as hf_logging

    from loraship.export.moe_trace import trace_every_expert

    hf_logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    try:
        model = hfcompat.load_causal_lm(model_dir, "merged model", dtype=torch_dtype, attn_implementation="eager")
        with warnings.catch_warnings(), trace_every_expert():
            warnings.simplefilter("ignore")
            onnx_export_from_model(model, out, task=TASK, do_validation=False, device="cpu")
    except (MemoryError, OSError, LorashipError):
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party traceback becomes one line
        raise BuildError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if not (out / "model.onnx").is_file():
        raise BuildError(f"optimum wrote no model.onnx for {model_dir}")


def _write_side_files(model_dir: Path, out: Path):
    """Tokenizer (with tokenizer.json), config.json and generation_config.json beside the ONNX file."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.is_fast:
        raise LorashipError(f"the tokenizer in {model_dir} has no fast (tokenizer.json) form", "save a fast tokenizer with the model")
    tokenizer.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig()
    generation.save_pretrained(out)
    config = hfcompat.read_json(model_dir / "config.json", "model config", "re-run `loraship merge`")
    (out / "config.json").write_text(json.dumps(hfcompat.translate_config(config), indent=2, sort_keys=True) + "\n")
    return tokenizer, generation.to_dict()
