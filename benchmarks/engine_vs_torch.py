"""Engine (ONNX Runtime) vs PyTorch eager ``generate`` and onnxruntime-genai on the same merged ``mid`` model.

Per-token decode latency, prefill time, end-to-end tokens/s and peak RSS at batch 1 and 8 (8
different prompts of 128 tokens, 128 new tokens each, greedy). Sides:

- ``torch``: PyTorch eager ``generate`` on the merged model (batch = one padded batch);
- ``engine``: the engine on the default export (``loraship export``: the genai builder's fp32 graph),
  given all prompts at once, which it decodes as in serving: every active row in one run per step;
- ``engine-optimum``: the engine on the optimum fp32 export (the fallback for other architectures);
- ``og``: onnxruntime-genai's ``og.Generator`` on the default export, a static batch;
- ``og-engine`` (with ``--og-engine-python``): onnxruntime-genai 0.18's ``og.Engine`` on the same export,
  run by another interpreter that has it (0.18's builder needs transformers 5, so it cannot share this
  environment). On a GroupQueryAttention export it schedules static batches: its dynamic batching needs
  the builder's PagedAttention graph, which is CUDA-only (fp16/bf16).

Each side runs in its own subprocess, so peak RSS is honest and neither side's threads or
allocations affect the other. Every side must produce exactly the requested number of tokens:
PyTorch gets ``min_new_tokens``, og ``min_length``, and the engine runs without EOS. Timestamps are
taken per generated token of row 0: prefill is the time to the first token, decode the median
interval between tokens (one step of the whole batch), end-to-end tokens/s all tokens over the
wall time of the run; each figure is the best of ``--runs`` runs. Ratios are printed last.

    python -m benchmarks.engine_vs_torch [--work DIR] [--arch phi3] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


SIDES = {"torch": "torch eager", "engine": "engine, default export (genai fp32)",
         "engine-optimum": "engine, optimum fp32 export", "og": "og.Generator, default export (genai fp32)",
         "og-engine": "og.Engine 0.18, default export (genai fp32)"}
DEFAULT_SIDES = "torch,engine,engine-optimum,og"


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    """``batch`` deterministic prompts of exactly ``length`` ids (BOS first, no special tokens)."""
    import random

    rng = random.Random(0)
    return [[1] + [rng.randrange(8, vocab) for _ in range(length - 1)] for _ in range(batch)]


def _summary(runs: list[tuple[float, list[float], float]]) -> dict:
    """Best-of-runs prefill, per-token decode (each run's median inter-token interval) and wall time.

    The minimum over runs and the median within a run keep the figures stable on a
    machine shared with other work.
    """
    return {"prefill_s": min(r[0] for r in runs),
            "decode_s_per_token": min(statistics.median(r[1]) for r in runs),
            "wall_s": min(r[2] for r in runs)}


def _intervals(start: float, stamps: list[float]) -> tuple[float, list[float], float]:
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], stamps[-1] - start


def timed_torch(model_dir: Path, batch: int, length: int, new: int, runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(prompts(model.config.vocab_size, batch, length))

    class Stamp(LogitsProcessor):  # called once per generated token, after that step's forward
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def once(n: int) -> tuple[float, list[float]]:
        stamp = Stamp()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=3, logits_processor=LogitsProcessorList([stamp]))
        assert out.shape[1] == length + n
        return _intervals(start, stamp.times)

    once(4)  # warm-up
    return _summary([once(new) for _ in range(runs)])


def timed_engine(onnx_dir: Path, batch: int, length: int, new: int, runs: int) -> dict:
    from loraship.engine import Engine, SamplingParams

    engine = Engine.load(onnx_dir, max_batch=batch)
    engine.eos_ids = frozenset()  # always produce `new` tokens, like min_new_tokens on the torch side
    ids = prompts(engine.tokenizer.get_vocab_size(), batch, length)

    def once(n: int) -> tuple[float, list[float]]:
        times: list[float] = []
        start = time.perf_counter()
        done = engine.generate(ids, SamplingParams(max_tokens=n),
                               on_token=lambda i, t, d: i == 0 and times.append(time.perf_counter()))
        assert all(len(c.token_ids) == n for c in done)
        return _intervals(start, times)

    once(4)  # warm-up
    return {**_summary([once(new) for _ in range(runs)]), "providers": engine.providers}


def timed_og(onnx_dir: Path, batch: int, length: int, new: int, runs: int) -> dict:
    """og.Generator, a static batch of equal-length prompts; one timestamp per generate_next_token."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    vocab = json.loads((onnx_dir / "config.json").read_text())["vocab_size"]
    ids = np.asarray(prompts(vocab, batch, length), np.int32)

    def once(n: int) -> tuple[float, list[float], float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + n, min_length=length + n, do_sample=False, batch_size=batch)
        generator = og.Generator(model, params)
        times: list[float] = []
        start = time.perf_counter()
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter())
        assert len(generator.get_sequence(0)) == length + n
        return _intervals(start, times)

    once(4)  # warm-up
    return {**_summary([once(new) for _ in range(runs)]), "onnxruntime_genai": og.__version__}


def timed_og_engine(onnx_dir: Path, batch: int, length: int, new: int, runs: int) -> dict:
    """og.Engine (onnxruntime-genai 0.18+): all requests submitted at once; timestamps of row 0's tokens."""
    import numpy as np
    import onnxruntime_genai as og

    config = json.loads((onnx_dir / "genai_config.json").read_text())
    config["engine"] = {"static_batching": {"max_batch_size": batch}}
    view = Path(tempfile.mkdtemp(prefix="og-engine-"))
    for item in onnx_dir.iterdir():
        if item.name != "genai_config.json":
            (view / item.name).symlink_to(item)
    (view / "genai_config.json").write_text(json.dumps(config))
    engine = og.Engine(og.Model(str(view)))
    ids = prompts(config["model"]["vocab_size"], batch, length)

    def once(n: int) -> tuple[float, list[float], float]:
        start = time.perf_counter()
        requests = []
        for prompt in ids:
            request = engine.create_request()
            turn = og.TurnOptions(request)
            turn.set_max_generated_tokens(n)
            turn.set_min_generated_tokens(n)
            turn.set_do_sample(False)
            request.begin_turn(np.asarray(prompt, np.int32), turn)
            requests.append(request)
        first, times, count = id(requests[0]), [], 0
        events = engine.create_event_buffer(4096)
        while engine.has_pending_requests():
            for event in engine.run(events):
                if event.token is not None and event.token >= 0:
                    count += 1
                    if id(event.request) == first:
                        times.append(time.perf_counter())
        for request in requests:
            request.close()
        assert count == n * batch, count
        return _intervals(start, times)

    once(4)  # warm-up
    return {**_summary([once(new) for _ in range(runs)]), "onnxruntime_genai": og.__version__}


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_main(args: argparse.Namespace) -> None:
    """Run one side in this process and print its JSON result."""
    fn = {"torch": timed_torch, "og": timed_og, "og-engine": timed_og_engine}.get(args.side, timed_engine)
    result = fn(Path(args.model), args.batch, args.prompt_tokens, args.new_tokens, args.runs)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def prepare(work: Path, arch: str) -> tuple[Path, Path, Path]:
    """Build (or reuse) the mid demo model, its merge and its two fp32 exports (default, optimum) under ``work``."""
    from loraship.export.demo_model import demo_model
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx
    from loraship.export.progress import Stages

    stage = Stages()
    demo, merged, onnx = work / f"demo-{arch}", work / f"merged-{arch}", work / f"default-fp32-{arch}"
    if not demo.exists():
        with stage(f"building mid {arch} demo model (random-init: speed depends only on the shapes)"):
            demo_model(demo, arch=arch, size="mid", random=True)
    if not merged.exists():
        with stage("merging the adapter"):
            merge(demo / "base", demo / "adapter", merged)
    if not onnx.exists():
        export_onnx(merged, onnx, dtype="fp32")
    optimum = work / f"optimum-fp32-{arch}"
    if not optimum.exists():
        export_onnx(merged, optimum, dtype="fp32", engine="optimum")
    return merged, onnx, optimum


def tokens_per_s(result: dict, batch: int, new: int) -> float:
    """End to end: every generated token of the batch over the run's wall time (prefill included)."""
    return batch * new / result["wall_s"]


def ratios(results: dict[tuple[str, int], dict], new: int) -> list[str]:
    """The ratios the targets are stated in, for whichever sides and batches ran."""
    lines = []
    batches = sorted({b for _, b in results})
    for batch in batches:
        if ("torch", batch) in results:
            t = results[("torch", batch)]
            for side in ("engine", "engine-optimum"):
                if (side, batch) in results:
                    e = results[(side, batch)]
                    lines.append(f"batch {batch}, {SIDES[side]}: decode ms/step engine/torch "
                                 f"{e['decode_s_per_token'] / t['decode_s_per_token']:.2f}, peak RSS engine/torch "
                                 f"{e['peak_rss_mb'] / t['peak_rss_mb']:.2f}")
    for side in ("engine", "og", "og-engine", "torch", "engine-optimum"):
        if (side, 1) in results:
            for batch in batches[1:]:
                if (side, batch) in results:
                    lines.append(f"{SIDES[side]}: end-to-end tokens/s at batch {batch} / batch 1: "
                                 f"{tokens_per_s(results[(side, batch)], batch, new) / tokens_per_s(results[(side, 1)], 1, new):.2f}"
                                 + (" (target >= 2.0)" if side == "engine" else ""))
    for batch in batches:
        for other in ("og", "og-engine"):
            if ("engine", batch) in results and (other, batch) in results:
                ratio = tokens_per_s(results[("engine", batch)], batch, new) / tokens_per_s(results[(other, batch)], batch, new)
                lines.append(f"batch {batch}: end-to-end tokens/s engine / {SIDES[other].split(',')[0]}: {ratio:.2f}"
                             + (" (target >= 1.0)" if batch > 1 and other == "og" else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="Folder for the mid model and its export (reused if present).")
    parser.add_argument("--arch", default="phi3", choices=["phi3", "llama"])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sides", default=DEFAULT_SIDES, help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument("--og-engine-python", help="a Python with onnxruntime-genai >= 0.18 (CPU) for the og-engine side; "
                        "adds the side. Make one: python -m venv /tmp/og18 && /tmp/og18/bin/pip install onnxruntime-genai==0.18.0")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side_main(args)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="loraship-bench-")
        args.work = Path(tmp.name)
    merged, onnx, optimum = prepare(args.work, args.arch)
    folders = {"torch": merged, "engine": onnx, "engine-optimum": optimum, "og": onnx, "og-engine": onnx}
    sides = args.sides.split(",") + (["og-engine"] if args.og_engine_python else [])
    results: dict[tuple[str, int], dict] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        for side in sides:
            model = folders[side]
            python = args.og_engine_python if side == "og-engine" else sys.executable
            with console.status(f"{side}, batch {batch} ..."):
                cmd = [python, "-m", f"benchmarks.{Path(__file__).stem}", "--side", side, "--model", str(model), "--batch", str(batch),
                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{side} batch {batch} failed:\n{proc.stderr[-2000:]}")
            results[(side, batch)] = json.loads(proc.stdout.strip().splitlines()[-1])

    import platform

    table = Table(title=f"mid {args.arch}: {args.prompt_tokens} prompt tokens, {args.new_tokens} new, "
                        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    for col in ("side", "batch", "prefill ms", "decode ms/step", "decode tokens/s", "end-to-end tokens/s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for (side, batch), r in results.items():
        per_tok = r["decode_s_per_token"] * 1000
        table.add_row(SIDES[side], str(batch), f"{r['prefill_s'] * 1000:.1f}", f"{per_tok:.2f}",
                      f"{batch * 1000 / per_tok:.1f}", f"{tokens_per_s(r, batch, args.new_tokens):.1f}", f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    for line in ratios(results, args.new_tokens):
        console.print(line)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
