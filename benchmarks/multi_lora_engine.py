"""Many fine-tunes on one base, through the engine: in-flight batching over LoRA slots vs merged models.

mid phi3 (random-init: speed depends only on shapes), four random peft adapters of rank 16 on the
attention projections (``qkv_proj``, ``o_proj``: per layer A [640, 16] + B [16, 1280] and A [640, 16] +
B [16, 640]; 10 layers), 8 different 128-token prompts, 128 new tokens each, greedy, EOS off. Every side
is the engine serving requests as a server does (``Engine.generate``: the scheduler's join-then-step loop,
each prompt prefilled into its KV row, one ONNX Runtime run per step for all rows; the fleet side runs one
scheduler thread per engine). Sides:

- ``slots 4 adapters, batch 8``: the base exported with 4 LoRA slots (gather), the 4 converted adapters
  registered, 2 requests on each; ``merged, batch 8``: adapter 0 merged and exported alone, the same 8
  prompts: target (a) slots >= 0.85 x merged;
- ``slots 1 adapter, batch 1`` vs ``merged, batch 1``: target (b) >= 0.85;
- ``4 merged models``: each fine-tune merged and exported, four engines in this one process sharing the
  cores (each its own scheduler thread, with every core's intra-op threads or with 1 each: the better of
  the two is the baseline), each given its 2 requests: target (c) slots at 8 >= 1.5 x this,
  and weights memory (every initializer byte: the export files, plus the slot buffers and the registered
  adapters' host copies) <= 0.35 x the 4 merged models'.

Every session is the Triton model's (``spin=False``) and flushes denormals to zero (the random merged
models meet subnormal floats the base does not: 9% of a step, ``RESULTS.md``, issue 19 foundation). The
sides run in turn, each first as often; each figure is the median of the rounds, each ratio the median of
the rounds' ratios (a busy neighbour slows a round's sides alike). On a shared machine a neighbour's burst
still lands on one side: each side's CPU time (``time.process_time``, every thread of this process) is
reported beside its wall time, and tokens per CPU-second leave the other processes out.

Also measured: (d) hot-load: the tiny demo adapter (and one of the mid rank-16 adapters) registered into
an engine whose scheduler thread is decoding 8 streams: the time to register it (read, sha256, host
memory), to copy it into a slot, and to the new adapter's first token; in-flight requests that failed.
(e) the admission rule: 16 requests over 4 adapters and the base on 2 slots, the engine's rule (a request
waiting for a slot blocks only those that need one) vs strict arrival order. ``--stages split`` (not run by
default) puts the slots' cost apart: CPU seconds of the 8 prefills and of the decode steps, slots over 4
adapters vs merged at batch 8, alternating.

    python -m benchmarks.multi_lora_engine [--work DIR] [--rounds 3] [--new-tokens 128]
    python -m benchmarks.multi_lora_engine --work DIR --rounds 6 --new-tokens 64 --stages split
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.engine_vs_torch import prompts
from benchmarks.multi_lora_slots import ADAPTERS, RANK, TARGETS
from benchmarks.multi_lora_slots import prepare as prepare_slots

SHAPES = (f"rank {RANK} on {'+'.join(TARGETS)} (per layer A [640,16]+B [16,1280] and A [640,16]+B [16,640]; "
          "10 layers; 1.95 MiB fp32 an adapter)")


def flush_denormals() -> None:
    """Every session this process opens flushes denormals to zero (the engine's options, and that)."""
    import onnxruntime as ort

    base = ort.SessionOptions

    class Flushing(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.add_session_config_entry("session.set_denormal_as_zero", "1")

    ort.SessionOptions = Flushing


def prepare(work: Path) -> dict:
    """Multi_lora_slots' models (base, 4 adapters, slots exports, converted adapters), plus every adapter's
    merged export, a base with 2 slots (the admission rule) and the tiny demo with slots (hot-load)."""
    from loraship.export.demo_model import demo_model
    from loraship.export.lora_convert import convert_adapter
    from loraship.export.lora_slots import add_lora_slots
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx

    prepared = prepare_slots(work)
    merged = [prepared["merged"]]
    for i in range(1, ADAPTERS):
        folder = work / f"merged-{i}-onnx"
        if not folder.exists():
            export_onnx(merge(work / "demo-phi3" / "base", work / f"adapter-{i}", work / f"merged-{i}"), folder)
        merged.append(folder)
    two = work / "slots-gather-2"
    if not two.exists():
        add_lora_slots(work / "base-onnx", two, max_adapters=2, max_rank=RANK, targets=["attention"])
    tiny = work / "tiny-demo"
    if not (tiny / "converted").exists():
        demo_model(tiny / "demo", arch="phi3", size="tiny", random=True, force=True)
        export_onnx(tiny / "demo" / "base", tiny / "base-onnx", force=True)
        add_lora_slots(tiny / "base-onnx", tiny / "slots", max_adapters=4, max_rank=8, force=True)
        convert_adapter(tiny / "demo" / "adapter", tiny / "slots", tiny / "converted", force=True)
    return {"merged": merged, "slots": prepared["slots"]["gather S=4"], "slots2": two,
            "converted": prepared["converted"]["attention"], "tiny_slots": tiny / "slots", "tiny_adapter": tiny / "converted"}


def load(folder: Path, adapters: list[Path] | None = None, **kwargs):
    from loraship.engine import Engine

    engine = Engine.load(folder, spin=False, **kwargs)
    for i, path in enumerate(adapters or []):
        engine.adapters.register(f"adapter-{i}", path)
    return engine


class Timed:
    """Token times of a run's requests: wall seconds, end-to-end tokens/s, decode ms/step, and the process's CPU
    seconds (every thread: ONNX Runtime's intra-op threads and the schedulers), which leave out the time other
    processes on a shared machine take from this one."""

    def __init__(self, count: int) -> None:
        self.times: list[list[float]] = [[] for _ in range(count)]
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def token(self, index: int) -> None:
        self.times[index].append(time.perf_counter())

    def result(self) -> dict:
        cpu = time.process_time() - self.cpu_start
        end = max(t[-1] for t in self.times)
        tokens = sum(len(t) for t in self.times)
        steps = [b - a for t in self.times for a, b in zip(t, t[1:])]
        return {"wall_s": end - self.start, "tokens_per_s": tokens / (end - self.start), "tokens": tokens,
                "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu,
                "decode_ms": statistics.median(steps) * 1e3, "ttft_ms": [(t[0] - self.start) * 1e3 for t in self.times]}


def run_one(engine, batch: list[list[int]], params, adapters: list[str | None] | None) -> tuple[dict, list[list[int]]]:
    timed = Timed(len(batch))
    completions = engine.generate(batch, params, on_token=lambda i, _t, _d: timed.token(i), adapters=adapters)
    return timed.result(), [c.token_ids for c in completions]


def run_fleet(engines: list, batch: list[list[int]], params) -> tuple[dict, list[list[int]]]:
    """Request i goes to engine i // 2 (its fine-tune); every engine's scheduler thread runs at once."""
    timed = Timed(len(batch))
    done = threading.Semaphore(0)
    requests = []
    for i, prompt in enumerate(batch):
        scheduler = engines[i // 2][1]
        requests.append(scheduler.submit(prompt, params, on_token=lambda *_a, i=i: timed.token(i),
                                         on_done=lambda *_a: done.release()))
    for _ in batch:
        done.acquire()
    return timed.result(), [r.completion.token_ids for r in requests]


def weights_bytes(folder: Path) -> int:
    """Every initializer byte of an export: its ONNX file and external data."""
    from loraship.engine.manifest import Manifest

    name = Manifest.read(folder).model_name
    return sum(p.stat().st_size for p in folder.iterdir() if p.name == name or p.name.startswith(name + "."))


def measure_speed(prepared: dict, rounds: int, prompt_tokens: int, new_tokens: int) -> dict:
    from loraship.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    slots = load(prepared["slots"], prepared["converted"], max_batch=8, max_context=prompt_tokens + new_tokens + 16)
    merged = load(prepared["merged"][0], max_batch=8, max_context=prompt_tokens + new_tokens + 16)
    fleets = {threads: [load(folder, max_batch=2, max_context=prompt_tokens + new_tokens + 16, threads=threads)
                        for folder in prepared["merged"]] for threads in (None, 1)}  # every core each, or 1 thread each
    fleet = {threads: [(engine, engine.scheduler()) for engine in engines] for threads, engines in fleets.items()}
    batch = prompts(merged.runner.layout.vocab, 8, prompt_tokens)
    spread = [f"adapter-{i // 2}" for i in range(8)]  # 2 requests per fine-tune
    sides = {
        ("slots 4 adapters", 8): lambda: run_one(slots, batch, params, spread),
        ("merged", 8): lambda: run_one(merged, batch, params, None),
        ("4 merged models", 8): lambda: run_fleet(fleet[None], batch, params),
        ("4 merged models, 1 thread each", 8): lambda: run_fleet(fleet[1], batch, params),
        ("slots 1 adapter", 1): lambda: run_one(slots, batch[:1], params, ["adapter-0"]),
        ("merged", 1): lambda: run_one(merged, batch[:1], params, None),
    }
    results: dict = {key: [] for key in sides}
    tokens: dict = {}
    order = list(sides)
    try:
        for r in range(rounds):
            for key in order[r % len(order):] + order[: r % len(order)]:
                result, tokens[key] = sides[key]()
                results[key].append(result)
                print(f"round {r + 1}: {key[0]} at {key[1]}: {result['tokens_per_s']:.1f} tokens/s, "
                      f"{result['tokens_per_cpu_s']:.1f} tokens/CPU-s (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for engines in fleet.values():
            for _, scheduler in engines:
                scheduler.close()
    # the slots rows decode their fine-tune's merged tokens: adapter 0 against the merged side, all against the fleet
    same = {"adapter-0 rows at 8 = merged": tokens[("slots 4 adapters", 8)][:2] == tokens[("merged", 8)][:2],
            "every row at 8 = its fine-tune's merged model": tokens[("slots 4 adapters", 8)] == tokens[("4 merged models", 8)],
            "batch 1 = merged": tokens[("slots 1 adapter", 1)] == tokens[("merged", 1)]}
    for what, ok in same.items():
        if not ok:
            print(f"warning: tokens differ: {what}")

    def ratio(a, b, key: str = "tokens_per_s") -> float:
        return statistics.median(x[key] / y[key] for x, y in zip(results[a], results[b]))

    layout = slots.adapters.layout
    host = sum(slots.adapters.get(name).weights.nbytes for name in slots.adapters.names())
    memory = {"slots": weights_bytes(prepared["slots"]) + layout.nbytes + host,
              "slot_export": weights_bytes(prepared["slots"]), "slot_buffers": layout.nbytes, "host_adapters": host,
              "merged_4": sum(weights_bytes(f) for f in prepared["merged"])}
    return {
        "sides": {f"{name} @ {batch}": {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                                        "tokens_per_cpu_s": statistics.median(x["tokens_per_cpu_s"] for x in runs),
                                        "decode_ms": statistics.median(x["decode_ms"] for x in runs),
                                        "wall_s": statistics.median(x["wall_s"] for x in runs),
                                        "rounds_tokens_per_s": [round(x["tokens_per_s"], 1) for x in runs]}
                  for (name, batch), runs in results.items()},
        "a_mixed_vs_merged_at_8": ratio(("slots 4 adapters", 8), ("merged", 8)),
        "b_one_adapter_vs_merged_at_1": ratio(("slots 1 adapter", 1), ("merged", 1)),
        "c_slots_vs_4_merged_models": ratio(("slots 4 adapters", 8), ("4 merged models", 8)),
        "c_slots_vs_4_merged_models_1_thread_each": ratio(("slots 4 adapters", 8), ("4 merged models, 1 thread each", 8)),
        "cpu_time": {"a": ratio(("slots 4 adapters", 8), ("merged", 8), "tokens_per_cpu_s"),
                     "b": ratio(("slots 1 adapter", 1), ("merged", 1), "tokens_per_cpu_s"),
                     "c": ratio(("slots 4 adapters", 8), ("4 merged models", 8), "tokens_per_cpu_s"),
                     "c_1_thread_each": ratio(("slots 4 adapters", 8), ("4 merged models, 1 thread each", 8), "tokens_per_cpu_s")},
        "c_weights_memory": memory, "c_weights_ratio": memory["slots"] / memory["merged_4"], "tokens_match": same,
    }


def measure_split(prepared: dict, rounds: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Where the slots' cost is: CPU seconds of the 8 prefills alone (``max_tokens=1``) and of the decode steps
    (a whole run less its prefills), slots over 4 adapters vs merged at batch 8, alternating; speed ratios."""
    from loraship.engine import SamplingParams

    context = prompt_tokens + new_tokens + 16
    sides = {"slots": (load(prepared["slots"], prepared["converted"], max_batch=8, max_context=context),
                       [f"adapter-{i // 2}" for i in range(8)]),
             "merged": (load(prepared["merged"][0], max_batch=8, max_context=context), None)}
    batch = prompts(sides["merged"][0].runner.layout.vocab, 8, prompt_tokens)

    def cpu(name: str, tokens: int) -> float:
        engine, adapters = sides[name]
        start = time.process_time()
        engine.generate(batch, SamplingParams(max_tokens=tokens, ignore_eos=True), adapters=adapters)
        return time.process_time() - start

    for name in sides:
        cpu(name, 2)  # warm
    figures: dict = {name: {"prefill": [], "decode": []} for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            prefill = cpu(name, 1)
            figures[name]["prefill"].append(prefill)
            figures[name]["decode"].append(cpu(name, new_tokens + 1) - prefill)
    ratio = {part: statistics.median(m / s for s, m in zip(figures["slots"][part], figures["merged"][part]))
             for part in ("prefill", "decode")}
    return {"cpu_s": {name: {part: statistics.median(v) for part, v in parts.items()} for name, parts in figures.items()},
            "slots_vs_merged_speed": ratio}


def measure_hot_load(prepared: dict, rounds: int, prompt_tokens: int) -> dict:
    """An adapter registered while 8 requests stream; its first request's first token; failures."""
    from loraship.engine import SamplingParams
    from loraship.engine.adapters import SlotTable, read_adapter

    cases = {"tiny demo adapter (rank 8, all 7 projections, 2 layers)": (prepared["tiny_slots"], prepared["tiny_adapter"],
                                                                          [prepared["tiny_adapter"]], 1000),
             f"mid adapter ({SHAPES})": (prepared["slots"], prepared["converted"][3], prepared["converted"][:1], None)}
    out = {}
    for label, (slots_dir, adapter, others, vocab) in cases.items():
        engine = load(slots_dir, others, max_batch=9, max_context=prompt_tokens + 200)
        copy = SlotTable(engine.adapters.layout)
        vocab = vocab or engine.runner.layout.vocab
        batch = prompts(vocab, 9, prompt_tokens)
        figures = []
        for _ in range(rounds):
            scheduler = engine.scheduler()
            failed, done, first = [], threading.Semaphore(0), threading.Event()

            def on_done(_completion, error):
                if error is not None:
                    failed.append(error)
                done.release()

            try:
                streams = [scheduler.submit(p, SamplingParams(max_tokens=160, ignore_eos=True), on_done=on_done,
                                            adapter="adapter-0" if i % 2 else None) for i, p in enumerate(batch[:8])]
                while min(len(s.generated) for s in streams) < 8:
                    time.sleep(0.002)
                start = time.perf_counter()
                engine.adapters.register("hot", adapter)
                registered = time.perf_counter() - start
                scheduler.submit(batch[8], SamplingParams(max_tokens=8, ignore_eos=True), on_token=lambda *_: first.set(),
                                 on_done=on_done, adapter="hot")
                first.wait(60)
                first_token = time.perf_counter() - start
                running = sum(not s.done for s in streams)
                for _ in range(9):
                    done.acquire()
            finally:
                scheduler.close()
            weights = read_adapter(adapter, engine.adapters.layout)
            start = time.perf_counter()
            copy.load(weights, name=f"copy-{len(figures)}")
            copy.unload(f"copy-{len(figures)}")
            slot_copy = time.perf_counter() - start
            engine.adapters.unregister("hot")
            figures.append({"register_ms": registered * 1e3, "slot_copy_ms": slot_copy * 1e3,
                            "first_token_ms": first_token * 1e3, "streams_running_at_first_token": running,
                            "failed": len(failed), "adapter_bytes": weights.nbytes})
        out[label] = {key: statistics.median(f[key] for f in figures) for key in figures[0]} | {
            "failed": sum(f["failed"] for f in figures), "max_first_token_ms": max(f["first_token_ms"] for f in figures)}
    return out


def measure_admission(prepared: dict, rounds: int, prompt_tokens: int) -> dict:
    """16 requests at once over 4 adapters and the base on 2 slots: the engine's rule vs strict arrival order."""
    from loraship.engine import SamplingParams
    from loraship.engine.adapter_admission import SlotAdmission
    from loraship.engine.scheduler import Scheduler

    engine = load(prepared["slots2"], prepared["converted"], max_batch=8, max_context=prompt_tokens + 64)
    kinds = ["adapter-0", "adapter-1", None, "adapter-2", "adapter-3", None, "adapter-0", "adapter-2"] * 2
    batch = prompts(engine.runner.layout.vocab, len(kinds), prompt_tokens)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    results: dict = {"engine rule": [], "strict FCFS": []}
    for r in range(rounds):
        for policy in (list(results) if r % 2 == 0 else list(results)[::-1]):
            scheduler = Scheduler(engine.new_batch(), engine.request, SlotAdmission(engine.adapters, strict=policy != "engine rule"))
            timed = Timed(len(batch))
            try:
                for i, (prompt, kind) in enumerate(zip(batch, kinds)):
                    scheduler.submit(prompt, params, on_token=lambda *_a, i=i: timed.token(i), adapter=kind)
                scheduler.run_until_done()
            finally:
                scheduler.close()
            result = timed.result()
            ttft = result["ttft_ms"]
            results[policy].append({"tokens_per_s": result["tokens_per_s"], "wall_s": result["wall_s"],
                                    "base_ttft_ms": statistics.mean(t for t, k in zip(ttft, kinds) if k is None),
                                    "adapter_ttft_ms": statistics.mean(t for t, k in zip(ttft, kinds) if k is not None),
                                    "max_ttft_ms": max(ttft)})
    return {policy: {key: statistics.median(x[key] for x in runs) for key in runs[0]} for policy, runs in results.items()}


def versions() -> dict:
    import numpy
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "cpu": cpu, "cores": os.cpu_count(), "load_avg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="Folder for the models and exports (reused if present).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--stages", default="speed,hot_load,admission")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="loraship-multilora-engine-"))
    prepared = prepare(work)
    flush_denormals()
    stages = args.stages.split(",")
    results = {"versions": versions(), "shapes": SHAPES}
    if "speed" in stages:
        results["speed"] = measure_speed(prepared, args.rounds, args.prompt_tokens, args.new_tokens)
    if "split" in stages:
        results["split"] = measure_split(prepared, args.rounds, args.prompt_tokens, args.new_tokens)
    if "hot_load" in stages:
        results["hot_load"] = measure_hot_load(prepared, args.rounds, args.prompt_tokens)
    if "admission" in stages:
        results["admission"] = measure_admission(prepared, args.rounds, args.prompt_tokens)
    results["versions"]["load_avg_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
