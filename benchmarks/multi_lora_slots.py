"""Per-row LoRA slots vs the merged model: decode tokens/s of the two slot designs, side by side.

mid phi3 (random-init: speed depends only on shapes), four random peft adapters of rank 16 on the
attention projections (``qkv_proj`` and ``o_proj``: per layer, A [640, 16] + B [16, 1280] and
A [640, 16] + B [16, 640]). Sides:

- ``merged``: adapter 1 merged into the base, the default export (no slots): the target's reference;
- ``gather S=N`` / ``masked S=N``: the base export with N slots (``loraship.export.lora_slots``), the four
  converted adapters resident, rows spread over 1 or 4 of them.

Each side decodes the way the engine does (``engine/slots.py``): its own KV rows planned at load, each
prompt prefilled alone into its row, then one ONNX Runtime run per step over all rows, inputs bound by
address (the slot buffers too). 8 different 128-token prompts (batch 8) or the first (batch 1), 128 new
tokens greedy; decode tokens/s = rows x new tokens / decode time. Every side decodes one step in turn
(each going first as often), so a busy neighbour slows all of them alike; each export runs on two
sessions opened in mirrored order (sessions opened first run slower); the median of the rounds is
reported, and each ratio is the median of the rounds' ratios. On a shared machine, also run
``--threads 1``: the CPU time of the one thread that runs each step is reported beside the wall time,
and it leaves out the time other processes take. Every session flushes denormals to zero (the random
merged model meets subnormal floats the base does not, which alone cost it ~9%); the sessions are
otherwise the engine's.

    python -m benchmarks.multi_lora_slots [--work DIR] [--rounds 5] [--new-tokens 128] [--threads N]
    python -m benchmarks.multi_lora_slots --work DIR --profile DIR   # where a step's time goes, per export
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.engine_vs_torch import prompts

ADAPTERS = 4
RANK = 16
TARGETS = ["qkv_proj", "o_proj"]
SLOT_COUNTS = (4, 16)
DESIGNS = ("gather", "masked")


def prepare(work: Path) -> dict:
    """Build (or reuse) under ``work``: the mid phi3 base, 4 attention adapters, the merged export of the
    first, the base export with slots for each design and slot count, and the converted adapters."""
    from loraship.export.demo_model import demo_model, random_adapter
    from loraship.export.lora_convert import convert_adapter
    from loraship.export.lora_slots import add_lora_slots
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx
    from loraship.export.progress import Stages

    stage = Stages()
    demo = work / "demo-phi3"
    if not demo.exists():
        with stage("building the mid phi3 demo model (random-init)"):
            demo_model(demo, arch="phi3", size="mid", random=True)
    adapters = []
    for i in range(ADAPTERS):
        path = work / f"adapter-{i}"
        if not path.exists():
            with stage(f"making random adapter {i} (rank {RANK}, {', '.join(TARGETS)})"):
                random_adapter(demo / "base", path, TARGETS, RANK, seed=100 + i)
        adapters.append(path)
    merged = work / "merged-0"
    if not merged.exists():
        merge(demo / "base", adapters[0], merged)
    merged_onnx = work / "merged-0-onnx"
    if not merged_onnx.exists():
        export_onnx(merged, merged_onnx)
    base_onnx = work / "base-onnx"
    if not base_onnx.exists():
        export_onnx(demo / "base", base_onnx)
    slots = {}  # side name -> export with slots
    for design in DESIGNS:
        for count in SLOT_COUNTS:
            path = work / f"slots-{design}-{count}"
            if not path.exists():
                add_lora_slots(base_onnx, path, max_adapters=count, max_rank=RANK, targets=["attention"], design=design)
            slots[f"{design} S={count}"] = path
    converted = {}  # slot layout (targets) -> the adapters converted for it
    for targets in ("attention", "attention,mlp"):
        if targets != "attention":  # what slots on every projection cost adapters that use the attention ones
            path = work / f"slots-{DESIGNS[0]}-{SLOT_COUNTS[0]}-all"
            if not path.exists():
                add_lora_slots(base_onnx, path, max_adapters=SLOT_COUNTS[0], max_rank=RANK, targets=targets.split(","))
            slots[f"{DESIGNS[0]} S={SLOT_COUNTS[0]}, slots on attention+mlp"] = path
        converted[targets] = []
        for i, adapter in enumerate(adapters):
            path = work / f"converted-{i}-{targets.replace(',', '-')}"
            if not path.exists():
                convert_adapter(adapter, slots[f"{DESIGNS[0]} S={SLOT_COUNTS[0]}"] if targets == "attention" else
                                slots[f"{DESIGNS[0]} S={SLOT_COUNTS[0]}, slots on attention+mlp"], path)
            converted[targets].append(path)
    return {"merged": merged_onnx, "slots": slots, "converted": converted}


def converted_for(prepared: dict, name: str) -> list[Path]:
    return prepared["converted"]["attention,mlp" if "attention+mlp" in name else "attention"]


class Export:
    """One export's session (and, with slots, its slot table holding the converted adapters)."""

    def __init__(self, folder: Path, converted: list[Path] | None, threads: int | None, profile: Path | None = None) -> None:
        import os

        import onnxruntime as ort

        from loraship.engine.adapters import SlotLayout, SlotTable
        from loraship.engine.session import DecoderLayout
        from loraship.export.manifest import read_export

        options = ort.SessionOptions()  # the engine's (engine/session.py create_session, spin=False), and:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # denormals as zero: the random-init merged model's steps meet subnormal floats that the base's
        # do not, which cost it ~9% (measured); flushed on every side, the sides differ by the LoRA only
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        if profile is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile / folder.name)
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        manifest = read_export(folder)
        self.layout = DecoderLayout.of(self.session, manifest.kv_heads, manifest.head_dim)
        self.table = None
        if converted is not None:
            self.table = SlotTable(SlotLayout.from_manifest(manifest))
            for i in range(self.table.slots):  # every slot filled, as on a busy server
                self.table.load(converted[i % len(converted)], name=f"adapter-{i}")


class Case:
    """One side at one batch: its own KV rows, decoding as the engine does (one run per step, inputs
    bound by address, the slot buffers too)."""

    def __init__(self, export: Export, batch: int, slots: list[int], capacity: int) -> None:
        from loraship.engine.kv_rows_cache import KVPlan, KVRowsCache

        self.export, self.batch, self.slots = export, batch, slots
        layout = export.layout
        self.cache = KVRowsCache(layout, KVPlan.of(layout, capacity, batch), "cpu")
        self.ids = np.zeros((batch, 1), np.int64)
        self.mask = np.zeros((batch, capacity), np.int64)
        self.positions = np.zeros((batch, 1), np.int64)
        self.lora_ids = np.asarray(slots, np.int64)
        self.logits = np.zeros((batch, 1, layout.vocab), np.float32)
        self.binding = None
        self.tokens: list[list[int]] = []

    def _bind_slots(self, binding, lora_ids: np.ndarray) -> None:
        if self.export.table is not None:
            binding.bind_input("lora_ids", "cpu", 0, np.int64, [len(lora_ids)], lora_ids.ctypes.data)
            self.export.table.bind(binding)

    def prefill(self, prompts: list[list[int]]) -> None:
        """Each prompt alone into its row (with its row's adapter); the first token of each."""
        session, layout = self.export.session, self.export.layout
        self.mask[:] = 0
        self.tokens = []
        for row, prompt in enumerate(prompts):
            ids = np.asarray([prompt], np.int64)
            binding = session.io_binding()
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", np.ones_like(ids))
            if layout.has_position_ids:
                binding.bind_cpu_input("position_ids", np.arange(ids.shape[1], dtype=np.int64)[None])
            self._bind_slots(binding, self.lora_ids[row:row + 1])
            binding.bind_output("logits", "cpu")
            self.cache.bind(binding, row, 1)
            session.run_with_iobinding(binding)
            self.mask[row, : len(prompt)] = 1
            self.positions[row, 0] = len(prompt)
            self.tokens.append([int(binding.get_outputs()[0].numpy()[0, -1].argmax())])
        if self.binding is None:
            self.binding = session.io_binding()
            for name, array in (("input_ids", self.ids), ("attention_mask", self.mask), ("position_ids", self.positions)):
                if name != "position_ids" or layout.has_position_ids:
                    self.binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            self._bind_slots(self.binding, self.lora_ids)
            self.binding.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
            self.cache.bind(self.binding, 0, self.batch)

    def step(self) -> tuple[float, float]:
        """One decode step for every row (greedy); return its wall seconds and this thread's CPU seconds
        (all of the run's CPU time with one ONNX Runtime thread, which runs in the caller's thread)."""
        for row in range(self.batch):
            position = int(self.positions[row, 0])
            self.ids[row, 0] = self.tokens[row][-1]
            self.mask[row, position] = 1
            self.positions[row, 0] = position + 1
        start, cpu = time.perf_counter(), time.thread_time()
        self.export.session.run_with_iobinding(self.binding)
        seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
        for row, next_id in enumerate(self.logits[:, 0].argmax(-1)):
            self.tokens[row].append(int(next_id))
        return seconds, cpu


def cases(prepared: dict) -> list[tuple[str, int, int, Path, bool]]:
    """(side, batch, distinct adapters, export folder, slotted) in the order they run each step."""
    rows = []
    for batch in (1, 8):
        rows.append(("merged", batch, 1, prepared["merged"], False))
        for name, folder in prepared["slots"].items():
            for distinct in ((1,) if batch == 1 else (1, ADAPTERS)):
                rows.append((name, batch, distinct, folder, True))
    return rows


def profile(prepared: dict, out: Path, threads: int | None, prompt_tokens: int, steps: int = 32) -> None:
    """Where a decode step's time goes: each export profiled alone (batch 8, rows on 4 adapters), the
    onnxruntime profile's node times split into the LoRA slots' nodes and the rest. Profiling adds a
    few microseconds to every node, which weighs most on the small LoRA nodes."""
    import collections

    out.mkdir(parents=True, exist_ok=True)
    batch = prompts(8192, 8, prompt_tokens)
    folders = {"merged": (prepared["merged"], None)}
    folders.update({name: (folder, converted_for(prepared, name)) for name, folder in prepared["slots"].items()})
    for name, (folder, converted) in folders.items():
        export = Export(folder, converted, threads, out)
        case = Case(export, 8, [0] * 8 if converted is None else [1 + r % ADAPTERS for r in range(8)], prompt_tokens + steps + 16)
        case.prefill(batch)
        for _ in range(steps):
            case.step()
        events = json.loads(Path(export.session.end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][8:]  # decode runs only
        nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]["ts"]]
        ops: collections.Counter = collections.Counter()
        for e in nodes:
            ops[("lora " if e["name"].startswith("/lora/") else "") + e["args"].get("op_name", "?")] += e["dur"] / len(runs) / 1e3
        lora = sum(ms for op, ms in ops.items() if op.startswith("lora "))
        print(f"{name}: {sum(r['dur'] for r in runs) / len(runs) / 1e3:.2f} ms a step (profiled), LoRA nodes {lora:.2f} ms, "
              f"{len(nodes) // len(runs)} nodes; " + ", ".join(f"{op} {ms:.2f}" for op, ms in ops.most_common(8)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="Folder for the model, adapters and exports (reused if present).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: every core).")
    parser.add_argument("--profile", type=Path, help="Instead: profile each export's decode steps (onnxruntime), files here.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    work = args.work or Path(tempfile.mkdtemp(prefix="loraship-multilora-"))
    prepared = prepare(work)
    if args.profile:
        profile(prepared, args.profile, args.threads, args.prompt_tokens)
        return
    capacity = args.prompt_tokens + args.new_tokens + 16
    # Sessions of one export differ by up to ~5% a step, the ones a process opens first being slower
    # (measured here; cause unknown). So every export gets two sessions, opened in mirrored order
    # (A B C .. C B A), each case runs on both, and its time is their sum.
    sides = cases(prepared)
    adapters = {folder: converted_for(prepared, name) if slotted else None for name, _, _, folder, slotted in sides}
    opened: dict[Path, list[Export]] = {}
    for folder in list(adapters) + list(adapters)[::-1]:
        opened.setdefault(folder, []).append(Export(folder, adapters[folder], args.threads))
    runs: list[tuple[tuple, Case]] = []
    for name, batch, distinct, folder, slotted in sides:
        slots = [1 + (row % distinct) for row in range(batch)] if slotted else [0] * batch
        runs += [((name, batch, distinct), Case(export, batch, slots, capacity)) for export in opened[folder]]
    batch8 = prompts(opened[prepared["merged"]][0].layout.vocab, 8, args.prompt_tokens)
    times: dict[tuple, list[float]] = {key: [] for key, _ in runs}
    cpu_times: dict[tuple, list[float]] = {key: [] for key, _ in runs}
    steps = args.new_tokens - 1
    for _ in range(args.rounds):
        for _, case in runs:
            case.prefill(batch8[: case.batch])
        total = {key: [0.0, 0.0] for key, _ in runs}
        for step in range(steps):  # every case steps in turn: a busy neighbour slows all alike
            for key, case in runs[step % len(runs):] + runs[: step % len(runs)]:  # and each goes first as often
                wall, cpu = case.step()
                total[key][0] += wall
                total[key][1] += cpu
        for key, (wall, cpu) in total.items():  # both sessions' steps: per step, halve
            times[key].append(wall / 2)
            cpu_times[key].append(cpu / 2)
    tokens = {key: case.tokens for key, case in runs}
    for (name, batch, distinct), rows in tokens.items():  # rows on slot 1 hold the merged model's adapter
        same = [rows[r] == tokens[("merged", batch, 1)][r] for r in range(batch) if r % distinct == 0]
        if name != "merged" and not all(same):
            print(f"warning: {name} batch {batch}: rows on adapter 1 decode other tokens than the merged model")

    shapes = f"rank {RANK} on {'+'.join(TARGETS)} (per layer A [640,16]+B [16,1280] and A [640,16]+B [16,640]; 10 layers)"
    table = Table(title=f"mid phi3, {shapes}; {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens greedy, "
                        f"{args.rounds} rounds (median)")
    one_thread = args.threads == 1  # only then does the calling thread's CPU time hold all of a step's
    for col in ("side", "batch", "distinct adapters", "decode ms/step", "tokens/s", "x merged") + \
            (("CPU ms/step", "x merged (CPU)") if one_thread else ()):
        table.add_column(col, justify="right")
    results = []
    for key, seconds in times.items():
        name, batch, distinct = key
        merged, merged_cpu, cpu = times[("merged", batch, 1)], cpu_times[("merged", batch, 1)], cpu_times[key]
        ratio = statistics.median(m / s for m, s in zip(merged, seconds))  # paired by round
        cpu_ratio = statistics.median(m / s for m, s in zip(merged_cpu, cpu))
        step, cpu_step = statistics.median(seconds) / steps, statistics.median(cpu) / steps
        results.append({"side": name, "batch": batch, "distinct": distinct, "ms_per_step": step * 1e3, "tokens_per_s": batch / step,
                        "ratio": ratio, "cpu_ms_per_step": cpu_step * 1e3, "cpu_ratio": cpu_ratio, "rounds_s": seconds})
        table.add_row(name, str(batch), str(distinct), f"{step * 1e3:.2f}", f"{batch / step:.1f}", f"{ratio:.3f}",
                      *((f"{cpu_step * 1e3:.2f}", f"{cpu_ratio:.3f}") if one_thread else ()))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
