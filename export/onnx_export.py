"""Export a merged model folder to a self-contained ONNX decoder folder with KV cache.

Engine ``genai`` (the default where it supports the architecture): the onnxruntime-genai model
builder (GroupQueryAttention, fp32/fp16, or int4 MatMulNBits weights), built for the CPU or, with
``target="cuda"``, for the CUDA provider (fp16 GQA kernels; the result still runs on the CPU
provider, so verify works here). The engine decodes it in place from KV rows planned at load,
all active requests in one run per step. Engine ``optimum`` (the fallback for other
architectures): optimum-onnx ``text-generation-with-past``, one decoder taking
``past_key_values.*`` and returning ``present.*``. fp16 is exported from the fp16 PyTorch
model on the CPU (the export traces the model; no CUDA is needed), so its KV cache and logits
are float16.

The folder holds ``model.onnx`` (+ external data), ``tokenizer.json`` and its configs,
``config.json``, ``generation_config.json``, when the model folder has one its ``eval.jsonl``
(see evalset.py), and ``loraship.json`` (see manifest.py), written last with the size and sha256
of every other file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from rich.console import Console

from loraship.errors import LorashipError
from loraship.export import hfcompat
from loraship.export.evalset import copy_eval, eval_source
from loraship.export.manifest import build_manifest, kv_cache_facts, write_checksummed
from loraship.export.progress import Stages
from loraship.fsutil import atomic_dir, check_out_dir

ENGINES = ("auto", "genai", "optimum")
# Text decoders the onnxruntime-genai 0.15 builder turns into GroupQueryAttention graphs with a
# KV cache the engine can share in place; `--engine auto` picks the builder for these.
GENAI_ARCHITECTURES = frozenset({
    "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
    "NemotronForCausalLM", "OlmoForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "SmolLM3ForCausalLM",
})
DTYPES = ("fp32", "fp16")
TARGETS = ("cpu", "cuda")
TASK = "text-generation-with-past"


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

    ``engine="auto"`` takes the onnxruntime-genai builder for the architectures in
    :data:`GENAI_ARCHITECTURES` and optimum for the others (with a one-line note).
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
    config = hfcompat.read_json(model / "config.json", "model config", "pass --model the folder written by `loraship merge`")
    if "max_position_embeddings" not in config or "model_type" not in config:
        raise LorashipError(f"{model}/config.json is not a causal LM config", "pass --model the folder written by `loraship merge`")
    stage = Stages(console)
    if engine == "auto":
        engine, why = choose_engine(config, dtype, int4, target)
        if why:
            stage.note(f"{why}; exporting with optimum, one graph for every provider (pass --engine to choose)")
            target = "cpu"  # the builder's option; optimum's graph needs none
    elif engine == "genai" and _builder_cpu_fp16(dtype, int4, target):
        raise LorashipError(f"the onnxruntime-genai builder's CPU fp16 graph does not run on ONNX Runtime {_ort_version()}",
                            "export fp16 for the GPU with --target cuda, or for the CPU with --engine optimum")
    if int4 and engine != "genai":
        raise LorashipError("--int4 needs the onnxruntime-genai builder", "add --engine genai")
    if target != "cpu" and engine != "genai":
        raise LorashipError("--target applies to the onnxruntime-genai builder (the optimum export runs on every provider)",
                            "add --engine genai, or drop --target")
    check_out_dir(out, force)
    evalset = eval_source(None, model)
    precision = "int4" if int4 else dtype
    with tempfile.TemporaryDirectory(prefix="loraship-export-") as work:
        view = hfcompat.compat_view(model, Path(work) / "model")
        with atomic_dir(out, force=force) as tmp:
            if engine == "optimum":
                with stage(f"exporting {config['model_type']} to ONNX ({TASK}, {dtype}) with optimum"):
                    _export_optimum(view, tmp, dtype)
            else:
                with stage(f"building {config['model_type']} ONNX ({precision}, {target}) with onnxruntime-genai"):
                    _export_genai(view, tmp, precision, target, Path(work) / "cache")
            with stage("writing tokenizer, configs and loraship.json (with every file's sha256)"):
                tokenizer, generation = _write_side_files(view, tmp)
                copy_eval(evalset, tmp)
                write_checksummed(tmp, build_manifest(engine, precision, hfcompat.translate_config(config), generation, tokenizer,
                                                      kv_cache_facts(tmp / "model.onnx")))
    return out


def _architecture(config: dict) -> str:
    return (config.get("architectures") or [config["model_type"]])[0]


def _builder_cpu_fp16(dtype: str, int4: bool, target: str) -> bool:
    """The builder's fp16 graph for the CPU (MultiHeadAttention with repeat_kv) fails in ONNX Runtime 1.32's
    memory planner, under og.Generator too; its fp32, int4 and CUDA fp16 graphs (GroupQueryAttention) run."""
    return dtype == "fp16" and not int4 and target == "cpu"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def choose_engine(config: dict, dtype: str = "fp32", int4: bool = False, target: str = "cpu") -> tuple[str, str | None]:
    """The exporter ``--engine auto`` takes, and why it is not the onnxruntime-genai builder (None when it is)."""
    if _architecture(config) not in GENAI_ARCHITECTURES:
        return "optimum", f"onnxruntime-genai's builder does not build {_architecture(config)}"
    if _builder_cpu_fp16(dtype, int4, target):
        return "optimum", "the onnxruntime-genai builder's fp16 graph runs only on CUDA (--target cuda)"
    return "genai", None


def _export_optimum(model_dir: Path, out: Path, dtype: str) -> None:
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export_from_model(model, out, task=TASK, do_validation=False, device="cpu")
    if not (out / "model.onnx").is_file():
        raise LorashipError(f"optimum wrote no model.onnx for {model_dir}", "run with --debug and report the architecture")


def _export_genai(model_dir: Path, out: Path, precision: str, target: str, cache: Path) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder",
           "-i", str(model_dir), "-o", str(out), "-p", precision, "-e", target, "-c", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        if "No space left" in proc.stderr:
            raise OSError(28, "No space left on device", str(out))
        raise LorashipError(f"onnxruntime-genai builder failed: {last}", "check that the builder supports this architecture")


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
