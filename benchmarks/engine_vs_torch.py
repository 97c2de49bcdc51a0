"""Engine (ONNX Runtime) vs PyTorch eager ``generate`` on the same merged ``mid`` model.

Per-token decode latency, prefill time and peak RSS at batch 1 and batch 8, with 128 prompt
tokens and 64 new tokens. Each side runs in its own subprocess, so peak RSS is honest and
neither side's threads or allocations affect the other. Both sides must produce exactly the
requested number of tokens: PyTorch gets ``min_new_tokens`` and the engine runs without EOS.
Timestamps are taken per generated token (a logits processor on the PyTorch side, the
engine's ``on_token``): prefill is the time to the first token, decode the median interval
between tokens; each figure is the best of ``--runs`` runs. The ratio engine/torch is printed last.

At batch 1 the engine also runs the onnxruntime-genai fp32 export of the same merged model
(``loraship export --engine genai``), which decodes from fixed KV slots; at larger batches it
would decode its rows one by one, so it is not run there.

    python benchmarks/engine_vs_torch.py [--work DIR] [--arch phi3] [--batches 1,8]
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


SIDES = {"torch": "torch eager", "engine": "engine (optimum fp32 export)", "engine-genai": "engine (genai fp32 export)"}


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    """``batch`` deterministic prompts of exactly ``length`` ids (BOS first, no special tokens)."""
    import random

    rng = random.Random(0)
    return [[1] + [rng.randrange(8, vocab) for _ in range(length - 1)] for _ in range(batch)]


def _summary(runs: list[tuple[float, list[float]]]) -> dict:
    """Best-of-runs prefill and per-token decode (each run's median inter-token interval).

    The minimum over runs and the median within a run keep the figures stable on a
    machine shared with other work.
    """
    return {"prefill_s": min(r[0] for r in runs),
            "decode_s_per_token": min(statistics.median(r[1]) for r in runs)}


def _intervals(start: float, stamps: list[float]) -> tuple[float, list[float]]:
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


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

    engine = Engine.load(onnx_dir)
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


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_main(args: argparse.Namespace) -> None:
    """Run one side in this process and print its JSON result."""
    fn = timed_torch if args.side == "torch" else timed_engine  # both engine sides: timed_engine
    result = fn(Path(args.model), args.batch, args.prompt_tokens, args.new_tokens, args.runs)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def prepare(work: Path, arch: str) -> tuple[Path, Path, Path]:
    """Build (or reuse) the mid demo model, its merge and its two fp32 exports under ``work``."""
    from loraship.export.demo_model import demo_model
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx
    from loraship.export.progress import Stages

    stage = Stages()
    demo, merged, onnx = work / f"demo-{arch}", work / f"merged-{arch}", work / f"onnx-{arch}"
    if not demo.exists():
        with stage(f"building mid {arch} demo model"):
            demo_model(demo, arch=arch, size="mid")
    if not merged.exists():
        with stage("merging the adapter"):
            merge(demo / "base", demo / "adapter", merged)
    if not onnx.exists():
        export_onnx(merged, onnx, dtype="fp32")
    genai = work / f"genai-fp32-{arch}"
    if not genai.exists():
        export_onnx(merged, genai, dtype="fp32", engine="genai")
    return merged, onnx, genai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="Folder for the mid model and its export (reused if present).")
    parser.add_argument("--arch", default="phi3", choices=["phi3", "llama"])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
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
    merged, onnx, genai = prepare(args.work, args.arch)
    results: dict[tuple[str, int], dict] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        sides = [("torch", merged), ("engine", onnx)] + ([("engine-genai", genai)] if batch == 1 else [])
        for side, model in sides:
            with console.status(f"{side}, batch {batch} ..."):
                cmd = [sys.executable, __file__, "--side", side, "--model", str(model), "--batch", str(batch),
                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{side} batch {batch} failed:\n{proc.stderr[-2000:]}")
            results[(side, batch)] = json.loads(proc.stdout.strip().splitlines()[-1])

    import platform

    table = Table(title=f"mid {args.arch}: {args.prompt_tokens} prompt tokens, {args.new_tokens} new, "
                        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    for col in ("side", "batch", "prefill ms", "decode ms/token", "decode tokens/s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for (side, batch), r in results.items():
        per_tok = r["decode_s_per_token"] * 1000
        table.add_row(SIDES[side], str(batch),
                      f"{r['prefill_s'] * 1000:.1f}", f"{per_tok:.2f}", f"{batch * 1000 / per_tok:.1f}", f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    batches = sorted({b for _, b in results})
    for batch in batches:
        t, e = results[("torch", batch)], results[("engine", batch)]
        console.print(f"batch {batch}: prefill engine/torch {e['prefill_s'] / t['prefill_s']:.2f}, "
                      f"peak RSS engine/torch {e['peak_rss_mb'] / t['peak_rss_mb']:.2f}, "
                      f"decode engine/torch {e['decode_s_per_token'] / t['decode_s_per_token']:.2f}")
    if ("engine-genai", 1) in results:
        ratio = results[("engine-genai", 1)]["decode_s_per_token"] / results[("torch", 1)]["decode_s_per_token"]
        console.print(f"decode ms/token ratio engine (genai fp32 export)/torch at batch 1: {ratio:.2f}")
    first = batches[0]
    ratio = results[("engine", first)]["decode_s_per_token"] / results[("torch", first)]["decode_s_per_token"]
    console.print(f"decode ms/token ratio engine/torch at batch {first}: {ratio:.2f} (target <= 0.40; issue 6: <= 0.35)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
