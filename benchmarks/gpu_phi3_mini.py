"""GPU benchmark (issues 6, 10): decode of a random-init Phi-3-mini (3.8B, fp16): batch 1 against the bandwidth bound, and tokens/s at 1-32 concurrent requests.

One command runs everything on a CUDA machine and prints one table:

    python -m benchmarks.gpu_phi3_mini --work /tmp/phi3bench

Stages (each a subprocess, so GPU memory is freed between them; results land in
WORK/results/STAGE.json, and a stage whose result exists is skipped unless --force):

  build      random-init Phi3ForCausalLM with Phi-3-mini-4k-instruct's config, fp16, saved to WORK/hf,
             with a 32064-entry WordLevel tokenizer (latency does not depend on weights or text)
  bandwidth  device-to-device copy of a 4 GiB tensor (bytes read + bytes written per second)
  torch      PyTorch eager ``generate`` (fp16, cuda, greedy)
  export     optimum ``main_export(task="text-generation-with-past", device="cuda", dtype="fp16")``
  engine     ``loraship.engine.Engine.load(WORK/optimum, provider="cuda")`` (CUDA EP, IO binding)
  genai      ``onnxruntime_genai.models.builder`` fp16/cuda export, run by og.Generator and by the engine
  tensorrt   the engine with the TensorRT EP, when libnvinfer is loadable
  concurrency  tokens/s with N requests at once (--concurrency, default 1,8,16,32; 8 different 128-token
             prompts, repeated to N): the engine on the genai export (KV rows, with and without CUDA
             graphs), og.Generator's static batch, og.Engine's static batching (onnxruntime-genai >= 0.18)
  torch_batch  PyTorch eager ``generate`` at the same batch sizes
  triton     the engine through a local tritonserver (``loraship`` and nvidia-pytriton installed) vs the
             same engine's scheduler in-process, 8 closed-loop gRPC streams

Timing, the same for every runtime: T(n) is the wall time of one full greedy generation of n new
tokens from a fixed 128-token prompt (median of --repeats). Prefill (time to first token) = T(1);
decode ms/token = (T(128) - T(1)) / 127. EOS is disabled everywhere so every run makes 128 tokens.
Bound: tokens/s = copy bandwidth / parameter bytes (one read of every weight per decode step).

Concurrency figures are end to end: N x new tokens over the wall time of the whole generation (prefill
included), median of --repeats. Without CUDA it prints why and exits 0; ``--provider cpu --size tiny
--stages concurrency,triton`` dry-runs those stages on the CPU (with a genai export in WORK/genai). ``--builder-pythonpath`` gives the genai builder its own
PYTHONPATH (onnxruntime-genai 0.18's builder needs transformers 5, optimum-onnx needs < 4.58).

One module of ~700 lines on purpose: every stage follows the same timing protocol into the same
table, and the driver re-runs this module once per stage (``python -m benchmarks.gpu_phi3_mini --stage``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("build", "bandwidth", "torch", "export", "engine", "genai", "tensorrt", "concurrency", "torch_batch", "triton")
BATCH1_GRAPH_TOKENS_PER_S = 292.7  # run 2 (H200): engine with fixed KV slots + CUDA graphs, batch 1
VOCAB = 32064
SIZES = {
    # microsoft/Phi-3-mini-4k-instruct config.json
    "mini": dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, max_position_embeddings=4096, original_max_position_embeddings=4096),
    # a quick smoke run of the whole pipeline
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512, max_position_embeddings=4096, original_max_position_embeddings=4096),
}


# ---------------------------------------------------------------- helpers run inside stages

def _prompt(n: int, seed: int = 0, vocab: int = 32000) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def _batch(count: int, n: int, vocab: int) -> list[list[int]]:
    """``count`` prompts of ``n`` ids: 8 different ones, repeated."""
    return [_prompt(n, seed=k % 8, vocab=vocab) for k in range(count)]


def _median_time(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up; returns (seconds, last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _timings(run, n_new: int, repeats: int) -> dict:
    """Prefill and decode figures from ``run(n) -> token ids`` (synchronous)."""
    t1, _ = _median_time(lambda: run(1), repeats)
    tn, tokens = _median_time(lambda: run(n_new), repeats)
    tokens = [int(t) for t in tokens]
    if len(tokens) != n_new:
        raise RuntimeError(f"expected {n_new} new tokens, got {len(tokens)}")
    decode = (tn - t1) / (n_new - 1)
    return {"prefill_ms": t1 * 1e3, "decode_ms": decode * 1e3, "tokens_per_s": 1.0 / decode, "tokens": tokens}


def _import_engine():
    """``loraship.engine`` when installed, else the repo's engine/ folder as a top-level package (``-m`` run from
    the repository root puts it on the path)."""
    try:
        from loraship.engine import Engine, SamplingParams
    except ImportError:
        from engine import Engine, SamplingParams  # type: ignore[no-redef]
    return Engine, SamplingParams


def _import_ort():
    import torch  # noqa: F401  (loads the CUDA/cuDNN libraries onnxruntime-gpu links against)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return ort


def _write_manifest(folder: Path, engine: str, model_file: str, size: str = "mini") -> None:
    """The manifest for an export made here, last, with every file's checksum (``loraship repo`` wants them)."""
    try:
        from loraship.engine.integrity import write_checksummed
        from loraship.engine.manifest import Manifest
    except ImportError:
        from engine.integrity import write_checksummed  # type: ignore[no-redef]
        from engine.manifest import Manifest  # type: ignore[no-redef]
    dims = SIZES[size]
    write_checksummed(folder, Manifest(engine=engine, kv_cache="shared" if engine == "genai" else "grown", kv_dtype="float16",
                                       model_file=model_file, dtype="fp16", architecture="phi3", max_context=4096,
                                       eos_token_ids=(), pad_token_id=0, num_layers=dims["num_hidden_layers"],
                                       kv_heads=dims["num_key_value_heads"],
                                       head_dim=dims["hidden_size"] // dims["num_attention_heads"]))


def _load_engine(folder: Path, provider: str, **load):
    Engine, _ = _import_engine()
    start = time.perf_counter()
    engine = Engine.load(folder, provider=provider, **load)
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}[provider]
    if engine.providers[0] != wanted:
        raise RuntimeError(f"session fell back to {engine.providers}")
    return engine, time.perf_counter() - start


def _engine_timings(engine, args) -> dict:
    _, SamplingParams = _import_engine()
    prompt = _prompt(args.prompt_tokens)

    def run(n: int) -> list[int]:
        return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))[0].token_ids

    out = _timings(run, args.new_tokens, args.repeats)
    out["providers"] = engine.providers
    return out


# ---------------------------------------------------------------- stages

def stage_build(args) -> dict:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, Phi3Config, PreTrainedTokenizerFast

    hf = args.work / "hf"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", model_max_length=4096)
    config = Phi3Config(vocab_size=VOCAB, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                        rope_scaling=None, sliding_window=2047, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, dtype="float16", **SIZES[args.size])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    params = sum(p.numel() for p in model.parameters())
    tmp = args.work / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    shutil.rmtree(hf, ignore_errors=True)
    tmp.rename(hf)
    return {"params": params, "param_bytes": params * 2, "transformers": transformers.__version__}


def stage_bandwidth(args) -> dict:
    import torch

    n = 4 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(20)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(20)]
    for _ in range(3):
        dst.copy_(src)
    for s, e in zip(starts, ends):
        s.record()
        dst.copy_(src)
        e.record()
    torch.cuda.synchronize()
    if not torch.equal(dst[:: 1 << 20], src[:: 1 << 20]):
        raise RuntimeError("copy check failed")
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    return {"copy_bytes": 2 * n, "copy_ms": ms, "bytes_per_s": 2 * n / (ms / 1e3),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}


def stage_torch(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.work / "hf", dtype=torch.float16).to("cuda").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([_prompt(args.prompt_tokens)], device="cuda")

    @torch.inference_mode()
    def run(n: int) -> list[int]:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out[0, ids.shape[1]:].tolist()  # .tolist() synchronizes

    out = _timings(run, args.new_tokens, args.repeats)
    out.update(transformers=transformers.__version__, attn=model.config._attn_implementation)
    return out


def stage_export(args) -> dict:
    import optimum.exporters.onnx as oe

    folder = args.work / "optimum"
    tmp = args.work / "optimum.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    oe.main_export(str(args.work / "hf"), tmp, task="text-generation-with-past", device="cuda", dtype="fp16",
                   do_validation=False, no_post_process=True)
    if not (tmp / "tokenizer.json").is_file():  # optimum skips a tokenizer it cannot load with this transformers
        shutil.copy(args.work / "hf" / "tokenizer.json", tmp / "tokenizer.json")
    _write_manifest(tmp, "optimum", "model.onnx", args.size)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {"export_s": time.perf_counter() - start,
            "files": {p.name: p.stat().st_size for p in folder.iterdir()}}


def stage_engine(args) -> dict:
    ort = _import_ort()
    engine, load_s = _load_engine(args.work / "optimum", "cuda")
    out = _engine_timings(engine, args)
    out.update(load_s=load_s, onnxruntime=ort.__version__, graph_step_ms=_graph_step_ms(engine, ort, args.prompt_tokens))
    return out


def _graph_step_ms(engine, ort, past_len: int) -> float:
    """One decode step with every input and output already on the GPU: the ONNX graph's own time."""
    import numpy as np

    session, layout = engine.runner.session, engine.runner.layout
    kv = np.random.default_rng(0).standard_normal((1, layout.kv_heads, past_len, layout.head_dim)).astype(layout.kv_dtype)
    binding = session.io_binding()
    feeds = {"input_ids": np.array([[5]], np.int64), "attention_mask": np.ones((1, past_len + 1), np.int64)}
    if layout.has_position_ids:
        feeds["position_ids"] = np.array([[past_len]], np.int64)
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    past = ort.OrtValue.ortvalue_from_numpy(kv, "cuda", 0)
    for name in layout.past_names:
        binding.bind_ortvalue_input(name, past)
    for name in ["logits", *layout.present_names]:
        binding.bind_output(name, "cuda", 0)

    def step() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    seconds, _ = _median_time(lambda: [step() for _ in range(20)], 3)
    return seconds / 20 * 1e3


def stage_genai(args) -> dict:
    ort = _import_ort()
    import onnxruntime_genai as og

    folder = args.work / "genai"
    out: dict = {"onnxruntime_genai": og.__version__, "onnxruntime": ort.__version__}
    if not (folder / "genai_config.json").is_file():
        tmp = args.work / "genai.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        env = dict(os.environ)
        if args.builder_pythonpath is not None:
            env["PYTHONPATH"] = args.builder_pythonpath
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(args.work / "hf"),
                        "-o", str(tmp), "-p", "fp16", "-e", "cuda", "-c", str(args.work / "genai_cache")],
                       env=env, check=True)
        out["export_s"] = time.perf_counter() - start
        shutil.copy(args.work / "hf" / "tokenizer.json", tmp / "tokenizer.json")
        _write_manifest(tmp, "genai", "model.onnx", args.size)
        tmp.rename(folder)
    config = json.loads((folder / "genai_config.json").read_text())
    out["genai_config"] = {k: config["model"]["decoder"].get(k) for k in ("session_options",)}
    out["genai_config"]["search"] = config.get("search")
    prompt = _prompt(args.prompt_tokens)

    def og_timings(model_dir: Path) -> dict:
        model = og.Model(str(model_dir))

        def run(n: int) -> list[int]:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(prompt)
            while not generator.is_done():
                generator.generate_next_token()
            return list(generator.get_sequence(0))[len(prompt):]

        try:
            return _timings(run, args.new_tokens, args.repeats)
        finally:
            del model

    out["og"] = og_timings(folder)
    out["og_graph"] = _recorded(lambda: og_timings(_cuda_graph_copy(folder)))
    for key, load in (("engine", {}), ("engine_graph", {"cuda_graph": True})):
        out[key] = _recorded(lambda: _fresh_engine_timings(folder, args, **load))
    return out


def _recorded(measure) -> dict:
    """``measure()``, or its error as a table note (a variant may not run with this build)."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def _linked_copy(folder: Path, suffix: str, extra: dict, cuda_graph: bool = False) -> Path:
    """The genai export with ``extra`` merged into its genai_config (model files linked, not copied)."""
    copy = folder.parent / (folder.name + suffix)
    copy.mkdir(exist_ok=True)
    for item in folder.iterdir():
        if item.name != "genai_config.json" and not (copy / item.name).exists():
            (copy / item.name).symlink_to(item)
    config = {**json.loads((folder / "genai_config.json").read_text()), **extra}
    if cuda_graph:
        options = config["model"]["decoder"].setdefault("session_options", {}).setdefault("provider_options", [])
        cuda = next((o["cuda"] for o in options if "cuda" in o), None)
        if cuda is None:
            options.append({"cuda": {"enable_cuda_graph": "1"}})
        else:
            cuda["enable_cuda_graph"] = "1"
    (copy / "genai_config.json").write_text(json.dumps(config, indent=1))
    return copy


def _cuda_graph_copy(folder: Path) -> Path:
    """The genai export with CUDA graphs on in its genai_config."""
    return _linked_copy(folder, "-cudagraph", {}, cuda_graph=True)


def _fresh_engine_timings(folder: Path, args, **load) -> dict:
    """Engine figures on the genai export, plus its first generation on a fresh engine (cold shapes)."""
    _, SamplingParams = _import_engine()
    engine, load_s = _load_engine(folder, "cuda", **load)
    cold_prompt = _prompt(args.prompt_tokens + 45)
    start = time.perf_counter()
    engine.generate([cold_prompt], SamplingParams(max_tokens=64, temperature=0.0))
    cold = (time.perf_counter() - start) / 64
    return {**_engine_timings(engine, args), "load_s": load_s, "cold_ms_per_token": cold * 1e3}


def stage_tensorrt(args) -> dict:
    import ctypes

    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError as exc:
        return {"error": f"TensorRT libraries not loadable ({exc}); install tensorrt-cu13 to measure"}
    _import_ort()
    engine, load_s = _load_engine(args.work / "optimum", "tensorrt", trt_fp16=True, max_batch=1,
                                  trt_cache_dir=args.work / "trt_cache")
    return {**_engine_timings(engine, args), "load_s": load_s}


def _levels(args) -> list[int]:
    return [int(c) for c in args.concurrency.split(",")]


def _vocab(args) -> int:
    return min(32000, json.loads((args.work / "genai" / "genai_config.json").read_text())["model"]["vocab_size"])


def _per_level(args, run) -> dict:
    """``run(batch) -> completions`` timed at every level: end-to-end tokens/s (median of --repeats)."""
    out = {}
    for n in _levels(args):
        batch = _batch(n, args.prompt_tokens, _vocab(args))
        seconds, done = _median_time(lambda: run(batch), args.repeats)
        counts = [len(tokens) for tokens in done]
        if counts != [args.new_tokens] * n:
            raise RuntimeError(f"expected {args.new_tokens} new tokens per request, got {sorted(set(counts))}")
        out[str(n)] = {"tokens_per_s": n * args.new_tokens / seconds, "wall_s": seconds, "first_row": [int(t) for t in done[0]]}
    return out


def stage_concurrency(args) -> dict:
    if args.provider != "cpu":
        _import_ort()
    import onnxruntime_genai as og

    folder = args.work / "genai"
    out: dict = {"onnxruntime_genai": og.__version__}
    for key, load in (("engine", {}), ("engine_graph", {"cuda_graph": True})):
        if load and args.provider == "cpu":
            continue
        out[key] = _recorded(lambda: _engine_levels(folder, args, **load))
    out["og"] = _recorded(lambda: _og_levels(og, folder, args))
    out["og_engine"] = _recorded(lambda: _og_engine_levels(og, folder, args))
    return out


def _engine_levels(folder: Path, args, **load) -> dict:
    """The engine given N prompts at once: it decodes every row in one run per step (the serving path)."""
    _, SamplingParams = _import_engine()
    engine, load_s = _load_engine(folder, args.provider, max_batch=max(_levels(args)), max_context=args.engine_context, **load)
    params = SamplingParams(max_tokens=args.new_tokens)
    out = _per_level(args, lambda batch: [c.token_ids for c in engine.generate(batch, params)])
    return {"levels": out, "load_s": load_s, "kv_plan": engine.kv_plan.describe()}


def _og_levels(og, folder: Path, args) -> dict:
    """og.Generator, one static batch of N equal-length prompts."""
    import numpy as np

    model = og.Model(str(folder))

    def run(batch: list[list[int]]) -> list[list[int]]:
        params = og.GeneratorParams(model)
        length = args.prompt_tokens + args.new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=len(batch))
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(batch, np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return [list(generator.get_sequence(i))[args.prompt_tokens:] for i in range(len(batch))]

    try:
        return {"levels": _per_level(args, run)}
    finally:
        del model


def _og_engine_levels(og, folder: Path, args) -> dict:
    """og.Engine (onnxruntime-genai >= 0.18) on the same GQA export: its static batch scheduler (dynamic
    batching needs the builder's PagedAttention model, CUDA fp16/bf16 and transformers 5 only)."""
    import numpy as np

    if not hasattr(getattr(og, "Engine", None), "create_request"):
        return {"error": f"onnxruntime-genai {og.__version__} has no og.Engine (0.18+)"}
    copy = _linked_copy(folder, "-ogengine", {"engine": {"static_batching": {"max_batch_size": max(_levels(args))}}})
    model = og.Model(str(copy))
    engine = og.Engine(model)

    def run(batch: list[list[int]]) -> list[list[int]]:
        requests, tokens = [], {}
        for prompt in batch:
            request = engine.create_request()
            turn = og.TurnOptions(request)
            turn.set_max_generated_tokens(args.new_tokens)
            turn.set_min_generated_tokens(args.new_tokens)
            turn.set_do_sample(False)
            request.begin_turn(np.asarray(prompt, np.int32), turn)
            requests.append(request)
            tokens[id(request)] = []
        events = engine.create_event_buffer(4096)
        while engine.has_pending_requests():
            for event in engine.run(events):
                if event.token is not None and event.token >= 0:
                    tokens[id(event.request)].append(int(event.token))
        out = [tokens[id(r)] for r in requests]
        for request in requests:
            request.close()
        return out

    return {"levels": _per_level(args, run), "max_batch": engine.get_capabilities().configured_max_batch_size}


def stage_torch_batch(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.work / "hf", dtype=torch.float16).to("cuda").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    @torch.inference_mode()
    def run(batch: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(batch, device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False)
        return out[:, ids.shape[1]:].tolist()

    return {"levels": _per_level(args, run)}


def stage_triton(args) -> dict:
    """8 closed-loop gRPC streams through a local tritonserver vs the same scheduler in-process."""
    if args.provider != "cpu":
        _import_ort()
    from benchmarks import triton_vs_inprocess as tvi
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    _, SamplingParams = _import_engine()
    folder, repo = args.work / "genai", args.work / "triton-repo"
    words = [" ".join(f"w{t}" for t in _prompt(args.prompt_tokens, seed=k, vocab=_vocab(args))) for k in range(8)]
    prompt_of = lambda k: words[k % len(words)]  # noqa: E731 - WordLevel tokenizer: "w5 w77 ..." is those ids
    cuda = args.provider == "cuda"
    engine, _ = _load_engine(folder, args.provider, max_batch=8, max_context=args.engine_context, cuda_graph=cuda, spin=False)
    shutil.rmtree(repo, ignore_errors=True)
    write_version(folder, repo, ModelOptions(name=tvi.MODEL, max_batch_size=8, provider=args.provider, cuda_graph=cuda,
                                            max_context=args.engine_context))
    out = {}
    with TritonServer(repo, ready_timeout=900) as server:
        tvi.throughput(server.grpc_url, 8, 1, 8, prompt_of)  # warm-up: graphs captured, shapes planned
        tvi.inprocess_throughput(engine, 8, 1, 8, prompt_of)
        for concurrency in (1, 8):
            out[f"triton_{concurrency}"] = tvi.throughput(server.grpc_url, concurrency, args.repeats, args.new_tokens, prompt_of)
            out[f"inprocess_{concurrency}"] = tvi.inprocess_throughput(engine, concurrency, args.repeats, args.new_tokens,
                                                                       prompt_of)
    return out


# ---------------------------------------------------------------- driver and table

def _table(results: dict, args) -> list[list[str]]:
    bw = results.get("bandwidth", {}).get("bytes_per_s")
    model_bytes = results.get("build", {}).get("param_bytes")
    bound = bw / model_bytes if bw and model_bytes else None
    genai = results.get("genai", {})
    if "error" in genai:
        genai = {key: genai for key in ("og", "og_graph", "engine", "engine_graph")}
    ref, ref_name = results.get("torch", {}).get("tokens"), "PyTorch's"
    if ref is None:
        ref, ref_name = genai.get("og", {}).get("tokens"), "og.Generator's"
    rows = [("PyTorch eager generate (fp16)", results.get("torch")),
            ("loraship engine, CUDA EP + IO binding (optimum export)", results.get("engine")),
            ("onnxruntime-genai og.Generator (genai export)", genai.get("og")),
            ("og.Generator, CUDA graphs on (genai export)", genai.get("og_graph")),
            ("loraship engine, KV slots (genai export)", genai.get("engine")),
            ("loraship engine, KV slots + CUDA graphs (genai export)", genai.get("engine_graph")),
            ("loraship engine, TensorRT EP (optimum export)", results.get("tensorrt"))]
    table = []
    for name, r in rows:
        if r is None:
            table.append([name, "-", "-", "-", "-", "not run"])
        elif "error" in r:
            table.append([name, "-", "-", "-", "-", r["error"]])
        else:
            same = "-" if ref is None else str(next((i for i, (a, b) in enumerate(zip(ref, r["tokens"])) if a != b), len(ref)))
            pct = f"{100 * r['tokens_per_s'] / bound:.0f}%" if bound else "-"
            table.append([name, f"{r['prefill_ms']:.1f}", f"{r['decode_ms']:.2f}", f"{r['tokens_per_s']:.1f}", pct,
                          f"first {same} of {len(r['tokens'])} tokens equal {ref_name}"
                          + (f"; fresh engine {r['cold_ms_per_token']:.1f} ms/token" if "cold_ms_per_token" in r else "")])
    if bound:
        table.append(["bandwidth bound", "-", f"{1e3 / bound:.2f}", f"{bound:.1f}", "100%",
                      f"{bw / 1e12:.2f} TB/s copy (read+write) / {model_bytes / 1e9:.2f} GB of fp16 weights"])
    return table


def _concurrency_table(results: dict, args) -> tuple[list[list[str]], list[str]]:
    """Rows of tokens/s per level, and the target lines."""
    levels = [str(n) for n in _levels(args)]
    conc = results.get("concurrency", {})
    runtimes = [("loraship engine, KV rows + CUDA graphs", conc.get("engine_graph")),
                ("loraship engine, KV rows, no graphs", conc.get("engine")),
                ("onnxruntime-genai og.Generator, static batch", conc.get("og")),
                ("onnxruntime-genai og.Engine, static batching", conc.get("og_engine")),
                ("PyTorch eager generate (fp16)", results.get("torch_batch"))]
    rows = []
    for name, r in runtimes:
        if r is None or "error" in r:
            rows.append([name, *["-"] * (len(levels) + 1), "not run" if r is None else r["error"]])
            continue
        tps = [r["levels"].get(n, {}).get("tokens_per_s") for n in levels]
        ratio = f"{tps[levels.index('8')] / tps[0]:.1f}" if "8" in levels and tps[0] else "-"
        rows.append([name, *[f"{t:.0f}" if t else "-" for t in tps], ratio, r.get("kv_plan", "")])
    lines = []
    graph, og_static = conc.get("engine_graph") or conc.get("engine"), conc.get("og")
    if graph and "error" not in graph and "8" in graph["levels"]:
        one, eight = graph["levels"]["1"]["tokens_per_s"], graph["levels"]["8"]["tokens_per_s"]
        lines.append(f"engine at 8 / engine at 1: {eight / one:.2f} (target >= 6)")
        lines.append(f"engine at 1 / run 2's {BATCH1_GRAPH_TOKENS_PER_S} tok/s: {one / BATCH1_GRAPH_TOKENS_PER_S:.2f} (target >= 0.95)")
        if og_static and "error" not in og_static:
            lines.append(f"engine at 8 / og.Generator static batch 8: {eight / og_static['levels']['8']['tokens_per_s']:.2f} (target >= 1)")
    triton = results.get("triton", {})
    if "triton_8" in triton:
        lines.append(f"Triton (8 gRPC streams) / in-process scheduler at 8: {triton['triton_8'] / triton['inprocess_8']:.2f} "
                     f"(target >= 0.90; {triton['triton_8']:.0f} vs {triton['inprocess_8']:.0f} tok/s; at 1: "
                     f"{triton['triton_1']:.0f} vs {triton['inprocess_1']:.0f})")
    return rows, lines


def _print(results: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Phi-3-mini ({args.size}) fp16, batch 1, prompt {args.prompt_tokens}, "
                        f"{args.new_tokens} new tokens, greedy")
    for col in ("runtime", "prefill ms", "decode ms/token", "tokens/s", "% of bound", "note"):
        table.add_column(col)
    for row in _table(results, args):
        table.add_row(*row)
    console = Console(width=200)
    console.print(table)
    if "engine" in results and "graph_step_ms" in results["engine"]:
        console.print(f"ONNX graph alone (inputs/outputs pre-bound on the GPU, past {args.prompt_tokens}): "
                      f"{results['engine']['graph_step_ms']:.2f} ms/step")
    rows, lines = _concurrency_table(results, args)
    if any(row[1] != "-" for row in rows):
        conc = Table(title=f"tokens/s with N requests at once (8 different {args.prompt_tokens}-token prompts, "
                           f"{args.new_tokens} new tokens each, greedy, EOS off; end to end, prefill included)")
        for col in ("runtime", *[f"N={n}" for n in _levels(args)], "8 / 1", "note"):
            conc.add_column(col)
        for row in rows:
            conc.add_row(*row)
        console.print(conc)
    for line in lines:
        console.print(line)


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m benchmarks.gpu_phi3_mini --work /tmp/phi3bench")
    parser.add_argument("--work", type=Path, default=Path("/tmp/phi3bench"), help="scratch folder (~25 GB)")
    parser.add_argument("--size", choices=sorted(SIZES), default="mini")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--force", action="store_true", help="rerun stages that already have results")
    parser.add_argument("--builder-pythonpath", help="PYTHONPATH for the onnxruntime-genai builder subprocess")
    parser.add_argument("--concurrency", default="1,8,16,32", help="request counts of the concurrency stages")
    parser.add_argument("--engine-context", type=int, default=4096, help="the engine's max_context (KV row length)")
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: dry-run the concurrency and triton stages on a CPU (with --size tiny)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = parser.parse_args()
    results_dir = args.work / "results"

    if args.stage:
        results_dir.mkdir(parents=True, exist_ok=True)
        result = globals()[f"stage_{args.stage}"](args)
        (results_dir / f"{args.stage}.json").write_text(json.dumps(result, indent=1))
        return 0

    try:
        import torch
    except ImportError:
        print("gpu_phi3_mini: PyTorch is not installed; run this on a CUDA machine with torch.")
        return 0
    if not torch.cuda.is_available() and args.provider == "cuda":
        print("gpu_phi3_mini: no CUDA device here; this benchmark needs an NVIDIA GPU. Nothing was run.")
        return 0

    from rich.console import Console

    console = Console()
    results_dir.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    for stage in stages:
        path = results_dir / f"{stage}.json"
        if path.exists() and not args.force:
            console.print(f"[dim]{stage}: cached in {path}")
            continue
        console.rule(f"{stage}")
        start = time.perf_counter()
        cmd = [sys.executable, "-m", f"benchmarks.{Path(__file__).stem}", "--stage", stage, *sys.argv[1:]]
        if subprocess.run(cmd).returncode != 0:
            path.write_text(json.dumps({"error": f"stage {stage} failed (see its output above)"}))
        console.print(f"{stage}: {time.perf_counter() - start:.0f} s")
    results = {p.stem: json.loads(p.read_text()) for p in results_dir.glob("*.json")}
    _print(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
