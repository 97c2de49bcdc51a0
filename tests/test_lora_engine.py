"""The engine serving many adapters on one base export with LoRA slots, on real ONNX Runtime sessions (fp32,
CPU, 1 thread): rows on four adapters and the base decode in one run per step, each exactly as its adapter's
merged export run alone (`loraship merge` + the default export, through the same engine); rows joining and
leaving with different adapters, a long prompt prefilled in chunks on its adapter, a cancelled row; more
adapters than slots; the admission rule; registration while requests run (hot-load, unregister, the registry
file); the KV budget holding the slots; the slot buffers as device buffers written in place; and verify per
adapter. The tiny phi3 world is ``lora_worlds`` (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from loraship.engine import Engine, FinishReason, RequestError, RequestStatus, SamplingParams, UnknownAdapter
from loraship.engine.adapter_admission import SlotAdmission
from loraship.engine.adapter_registry import REGISTRY_FILE, RegistryError, read_registry, write_registry
from loraship.engine.adapters import AdapterError
from loraship.engine.device_slots import DeviceSlots
from loraship.engine.kv_rows import LONG_PROMPT
from loraship.engine.kv_rows_cache import GIB
from loraship.engine.request import Request
from loraship.engine.scheduler import Scheduler
from loraship.export.lora_slots import add_lora_slots

RANK = 8  # the LoRA worlds' slot rank
NAMES = ["a0", "a1", "a2", "a3"]  # a0: the demo adapter (rank 8, every projection); a1-a3: other ranks and targets


@pytest.fixture(scope="module")
def world(lora_worlds):
    return lora_worlds("phi3")


@pytest.fixture(scope="module")
def slot_exports(world, tmp_path_factory):
    """The base with 4 slots (the world's), and with 2 and 1 (same layout: the converted adapters fit all)."""
    root = tmp_path_factory.mktemp("slot-counts")
    exports = {4: world.slots["gather"]}
    for count in (2, 1):
        exports[count] = add_lora_slots(world.base_onnx, root / f"slots-{count}", max_adapters=count, max_rank=RANK)
    return exports


class References:
    """Greedy tokens and every step's logits of a prompt on each adapter's merged export (None: the base's
    default export), run alone through the engine."""

    def __init__(self, world) -> None:
        self.world = world
        self._engines: dict[str | None, Engine] = {}
        self._cache: dict[tuple, tuple[list[int], list[np.ndarray]]] = {}

    def __call__(self, adapter: str | None, prompt: list[int], max_tokens: int) -> tuple[list[int], list[np.ndarray]]:
        key = (adapter, tuple(prompt), max_tokens)
        if key not in self._cache:
            if adapter not in self._engines:
                folder = self.world.base_onnx if adapter is None else self.world.merged[NAMES.index(adapter)]
                self._engines[adapter] = Engine.load(folder, threads=1, max_batch=1)
            with record_logits() as logs:
                [completion] = self._engines[adapter].generate([prompt], params(max_tokens))
            self._cache[key] = (completion.token_ids, logs[tuple(prompt)])
        return self._cache[key]

    def tokens(self, adapter: str | None, prompt: list[int], max_tokens: int) -> list[int]:
        return self(adapter, prompt, max_tokens)[0]


@pytest.fixture(scope="module")
def reference(world):
    return References(world)


class record_logits:
    """Within the block, every logits row a request samples from, by the request's prompt: [prefill, step 1, ...]."""

    def __enter__(self) -> dict[tuple, list[np.ndarray]]:
        self.logs: dict[tuple, list[np.ndarray]] = {}
        self.original = Request.sample
        logs, original = self.logs, self.original

        def sample(request, logits, eos_ids):
            logs.setdefault(tuple(request.prompt_ids), []).append(np.array(logits, np.float32, copy=True))
            return original(request, logits, eos_ids)

        Request.sample = sample
        return self.logs

    def __exit__(self, *exc) -> None:
        Request.sample = self.original


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # greedy, and lengths as planned


def prompts(count: int, length: int = 12, seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(8, 1000, length - 1).tolist() for _ in range(count)]


def serving(folder: Path, world, names=NAMES, **kwargs) -> Engine:
    engine = Engine.load(folder, threads=1, **kwargs)
    for name in names:
        engine.adapters.register(name, world.converted[NAMES.index(name)])
    return engine


def test_mixed_batch_decodes_every_row_as_its_merged_export_in_one_run_per_step(world, reference):
    """Rows on four adapters and the base, in one batch: each row's greedy tokens are its adapter's merged
    export's, run alone; its prefill and every decode step's logits are within 1e-4 of that export's. All rows
    decode in one ONNX Runtime run per step: 5 prefill runs, then one run for each of the 15 steps."""
    engine = serving(world.slots["gather"], world, max_batch=8)
    rows = ["a0", "a1", None, "a2", "a3"]
    asked = prompts(len(rows))
    runs = []
    session = engine.runner.session
    session.run_with_iobinding = lambda binding, options=None, _run=session.run_with_iobinding: runs.append(1) or _run(binding, options)
    with record_logits() as logs:
        completions = engine.generate(asked, params(16), adapters=rows)
    assert len(runs) == len(rows) + 15
    assert set(engine.adapters.table.resident) == {engine.adapters.get(n).key for n in NAMES}
    for prompt, name, completion in zip(asked, rows, completions):
        tokens, ref_logits = reference(name, prompt, 16)
        assert completion.token_ids == tokens, name
        got = logs[tuple(prompt)]
        assert len(got) == len(ref_logits) == 16
        assert np.abs(got[1] - ref_logits[1]).max() < 1e-4, name  # the first decode step
        assert max(np.abs(g - r).max() for g, r in zip(got, ref_logits)) < 1e-4, name
    base_tokens = reference.tokens(None, asked[0], 16)
    assert completions[0].token_ids != base_tokens  # the adapter really changes the row
    logits = engine.prefill_logits(asked[:3], adapters=rows[:3])
    for row, name in enumerate(rows[:3]):
        assert np.abs(logits[row] - reference(name, asked[row], 16)[1][0]).max() < 1e-4


def test_rows_join_and_leave_with_different_adapters(world, reference):
    """In-flight batching on 4 rows: requests on different adapters and the base join between steps as rows
    free up, one with a prompt longer than LONG_PROMPT (prefilled in chunks between steps, on its adapter), one
    cancelled while it runs. Every finished request decodes its merged export's tokens; the cancelled one a
    prefix of them; every slot is released at the end."""
    engine = serving(world.slots["gather"], world, max_batch=4)
    scheduler = engine.scheduler(start=False)
    asked = prompts(7, seed=3)
    long = prompts(1, LONG_PROMPT + 44, seed=5)[0]
    plan = {}  # label -> (request, adapter, prompt, max_tokens)

    def submit(label, prompt, max_tokens, adapter):
        plan[label] = (scheduler.submit(prompt, params(max_tokens), adapter=adapter), adapter, prompt, max_tokens)

    try:
        submit("a0", asked[0], 12, "a0")
        submit("base", asked[1], 5, None)
        submit("cancelled", asked[2], 20, "a3")
        for _ in range(3):
            scheduler.step()
        submit("a1", asked[3], 9, "a1")
        submit("long-a2", long, 6, "a2")  # no row for it yet: it waits
        scheduler.step()
        assert plan["long-a2"][0].status == RequestStatus.WAITING
        plan["cancelled"][0].cancel()
        for _ in range(3):
            scheduler.step()
        assert plan["long-a2"][0].status in (RequestStatus.PREFILLING, RequestStatus.RUNNING)
        submit("a3", asked[4], 7, "a3")
        submit("base-2", asked[5], 4, None)
        submit("a0-2", asked[6], 3, "a0")
        scheduler.run_until_done()
    finally:
        scheduler.close()
    for label, (request, adapter, prompt, max_tokens) in plan.items():
        tokens = reference.tokens(adapter, prompt, max_tokens)
        if label == "cancelled":
            assert request.completion.finish_reason == FinishReason.CANCELLED
            assert 0 < len(request.generated) < max_tokens and request.generated == tokens[: len(request.generated)]
        else:
            assert request.error is None and request.completion.token_ids == tokens, label
    table = engine.adapters.table
    assert all(table.users(key) == 0 for key in table.resident)


def test_more_adapters_than_slots_every_request_completes(world, reference, slot_exports):
    """2 slots, 4 adapters registered, 10 requests on all of them and the base: requests wait for a slot,
    adapters are copied into freed slots (evicting the least recently used), and every request decodes its
    merged export's tokens."""
    engine = serving(slot_exports[2], world, max_batch=6)
    assert engine.adapters.table.slots == 2 and engine.adapters.names() == NAMES
    rows = ["a0", "a1", "a2", "a3", None, "a3", "a2", "a1", "a0", None]
    asked = prompts(len(rows), seed=11)
    lengths = [6 + 3 * (i % 3) for i in range(len(rows))]
    completions = engine.generate(asked, [params(n) for n in lengths], adapters=rows)
    for prompt, name, n, completion in zip(asked, rows, lengths, completions):
        assert completion.token_ids == reference.tokens(name, prompt, n), name
    admission = engine._admission
    assert admission.loads >= 5 and admission.waits > 0  # more loads than slots: adapters took turns
    assert len(engine.adapters.table.resident) == 2


def test_a_request_waiting_for_a_slot_blocks_only_requests_that_need_one(world, reference, slot_exports):
    """1 slot. a0 runs; a1 must wait for the slot; the base request behind it joins at once, and so does
    nothing else that needs the slot: the a0 request behind a1 waits (a0's slot drains for a1), so a1 runs
    as soon as a0's running request ends. Strict arrival order would keep the base request out too."""
    order = ["a0", "a1", None, "a0"]
    asked = prompts(len(order), seed=13)
    lengths = [6, 4, 3, 3]
    for strict in (False, True):
        engine = serving(slot_exports[1], world, names=["a0", "a1"], max_batch=4)
        scheduler = Scheduler(engine.new_batch(), engine.request, SlotAdmission(engine.adapters, strict=strict))
        try:
            requests = [scheduler.submit(p, params(n), adapter=a) for p, n, a in zip(asked, lengths, order)]
            scheduler.step()
            statuses = [r.status for r in requests]
            joined_at: dict[int, int] = {}
            step = 1
            while scheduler.has_work:
                for i, r in enumerate(requests):
                    if r.generated and i not in joined_at:
                        joined_at[i] = step
                scheduler.step()
                step += 1
        finally:
            scheduler.close()
        running, waiting = RequestStatus.RUNNING, RequestStatus.WAITING
        if strict:
            assert statuses == [running, waiting, waiting, waiting]
        else:
            assert statuses == [running, waiting, running, waiting]
            assert joined_at[1] == 6  # a0's request (6 tokens) ended at step 5; a1 joined the next step
            assert joined_at[3] > joined_at[1]  # the later a0 request waited behind a1 (FCFS among slot users)
        for r, prompt, n, name in zip(requests, asked, lengths, order):
            assert r.completion.token_ids == reference.tokens(name, prompt, n)


def test_unregister_while_in_flight(world, reference):
    """Unregistering an adapter refuses new requests on it at once, in one line; its requests running and
    queued finish on it; its slot is freed once they have."""
    engine = serving(world.slots["gather"], world, names=["a0", "a1"], max_batch=2)
    scheduler = engine.scheduler(start=False)
    asked = prompts(4, seed=17)
    try:
        running = [scheduler.submit(p, params(8), adapter="a1") for p in asked[:2]]
        queued = scheduler.submit(asked[2], params(5), adapter="a1")
        scheduler.step()
        scheduler.step()
        assert [r.status for r in running] == [RequestStatus.RUNNING] * 2 and queued.status == RequestStatus.WAITING
        key = engine.adapters.get("a1").key
        engine.adapters.unregister("a1")
        with pytest.raises(UnknownAdapter) as err:
            scheduler.submit(asked[3], params(4), adapter="a1")
        assert str(err.value) == ("adapter 'a1' is not served by this model (adapters: a0); name a registered adapter, "
                                  "or none for the base model")
        other = scheduler.submit(asked[3], params(4), adapter="a0")
        scheduler.run_until_done()
    finally:
        scheduler.close()
    for r, prompt, n in ((running[0], asked[0], 8), (running[1], asked[1], 8), (queued, asked[2], 5)):
        assert r.error is None and r.completion.token_ids == reference.tokens("a1", prompt, n)
    assert other.completion.token_ids == reference.tokens("a0", asked[3], 4)
    assert key not in engine.adapters.table.resident and engine.adapters.names() == ["a0"]
    with pytest.raises(UnknownAdapter, match=r"^adapter 'a1' is not registered \(adapters: a0\)$"):
        engine.adapters.unregister("a1")


def test_unknown_adapters_and_bad_registrations_are_refused_in_one_line(world, tmp_path, onnx_dir):
    engine = serving(world.slots["gather"], world, names=["a0"])
    with pytest.raises(UnknownAdapter, match=r"^adapter 'nope' is not served by this model \(adapters: a0\)"):
        engine.request([1, 2, 3], params(2), adapter="nope")
    with pytest.raises(RequestError, match="this model serves no adapters, so adapter 'a0' cannot be chosen"):
        Engine.load(onnx_dir, threads=1).request([1, 2, 3], params(2), adapter="a0")
    with pytest.raises(RegistryError, match="adapter name 'a b' is not valid"):
        engine.adapters.register("a b", world.converted[1])
    with pytest.raises(RegistryError, match=r"adapter 'a0' is already registered \(from .*converted-0\); unregister it first"):
        engine.adapters.register("a0", world.converted[1])
    assert engine.adapters.register("a0", world.converted[0]) is engine.adapters.get("a0")  # the same files: no change
    tampered = shutil.copytree(world.converted[1], tmp_path / "tampered")
    data = bytearray((tampered / "adapter_slots.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "adapter_slots.safetensors").write_bytes(bytes(data))
    foreign = shutil.copytree(world.converted[1], tmp_path / "foreign")
    manifest = json.loads((foreign / "loraship.json").read_text())
    (foreign / "loraship.json").write_text(json.dumps({**manifest, "layout": "0" * 64}))
    for folder, message in ((tampered, "differs from the export"), (foreign, "was converted for another base export"),
                            (tmp_path, "is not a converted adapter")):
        with pytest.raises(AdapterError, match=message) as err:
            engine.adapters.register("x", folder)
        assert "\n" not in str(err.value)
    assert engine.adapters.names() == ["a0"]


def test_registry_file_sync_applies_the_difference(world, reference, tmp_path):
    """multi_lora.json (name -> converted folder, relative to the file) read by ``sync``: names added,
    removed, re-registered when their files change (a request running on the old weights finishes on them,
    the next one gets the new), an entry that fails reported while the rest apply, a malformed file refused."""
    model = tmp_path / "model"
    (model / "adapters").mkdir(parents=True)
    for name, index in (("sql", 1), ("roman", 2)):
        shutil.copytree(world.converted[index], model / "adapters" / name)
    registry = model / REGISTRY_FILE
    write_registry(registry, {"sql": "adapters/sql", "roman": "adapters/roman"})
    assert read_registry(registry) == {"roman": model / "adapters/roman", "sql": model / "adapters/sql"}
    engine = Engine.load(world.slots["gather"], threads=1, max_batch=4)
    report = engine.adapters.sync(registry)
    assert (report.added, report.removed, report.replaced, report.failed) == (["roman", "sql"], [], [], {})  # the file is written sorted
    assert not engine.adapters.sync(registry).changed
    scheduler = engine.scheduler(start=False)
    asked = prompts(2, seed=19)
    try:
        old = scheduler.submit(asked[0], params(8), adapter="roman")
        scheduler.step()
        shutil.rmtree(model / "adapters" / "roman")  # the folder rewritten with other weights
        shutil.copytree(world.converted[3], model / "adapters" / "roman")
        shutil.copytree(world.converted[0], tmp_path / "elsewhere")
        broken = shutil.copytree(world.converted[1], model / "adapters" / "broken")
        (broken / "adapter_slots.safetensors").write_bytes(b"\0" * 16)
        write_registry(registry, {"roman": "adapters/roman", "demo": str(tmp_path / "elsewhere"), "broken": "adapters/broken"})
        report = engine.adapters.sync(registry)
        assert (report.added, report.removed, report.replaced) == (["demo"], ["sql"], ["roman"])
        assert list(report.failed) == ["broken"] and "truncated or replaced" in report.failed["broken"]
        assert engine.adapters.names() == ["demo", "roman"]
        new = scheduler.submit(asked[1], params(8), adapter="roman")
        scheduler.run_until_done()
    finally:
        scheduler.close()
    assert old.completion.token_ids == reference.tokens("a2", asked[0], 8)  # the weights it started with
    assert new.completion.token_ids == reference.tokens("a3", asked[1], 8)
    assert [key.partition("@")[0] for key in engine.adapters.table.resident] == ["roman"]  # the old weights' slot freed
    registry.write_text("[1, 2]")
    with pytest.raises(RegistryError, match=r"multi_lora\.json is not a JSON object of adapter name -> folder$"):
        engine.adapters.sync(registry)
    registry.write_text('{"ok": 3}')
    with pytest.raises(RegistryError, match=r"'ok' maps to 3, not the path of a converted adapter"):
        engine.adapters.sync(registry)
    with pytest.raises(RegistryError, match=r"not found; write \{\} there to serve no adapters"):
        engine.adapters.sync(tmp_path / "missing.json")
    assert engine.adapters.names() == ["demo", "roman"]


def test_hot_load_while_requests_stream(world, reference, record_property):
    """The tiny demo adapter registered while four requests stream on the scheduler's thread: none of them
    fails, the new adapter's first request decodes its merged export's tokens, and the time to register it
    (read, checksums, host memory) and to its first token are recorded (not asserted: timing lives in
    benchmarks/)."""
    engine = serving(world.slots["gather"], world, names=["a1"], max_batch=6)
    scheduler = engine.scheduler()
    asked = prompts(5, seed=23)
    errors, done = [], threading.Semaphore(0)

    def on_done(_completion, error):
        if error is not None:
            errors.append(error)
        done.release()

    try:
        streams = [scheduler.submit(p, params(200), on_done=on_done, adapter="a1" if i % 2 else None)
                   for i, p in enumerate(asked[:4])]
        while min(len(s.generated) for s in streams) < 4:
            time.sleep(0.005)
        first = threading.Event()
        start = time.perf_counter()
        engine.adapters.register("demo", world.converted[0])
        registered = time.perf_counter() - start
        hot = scheduler.submit(asked[4], params(16), on_token=lambda *_: first.set(), on_done=on_done, adapter="demo")
        assert first.wait(30)
        first_token = time.perf_counter() - start
        assert all(not s.done for s in streams)  # the streams ran on through the load
        for _ in range(5):
            assert done.acquire(timeout=60)
    finally:
        scheduler.close()
    assert errors == []
    assert hot.completion.token_ids == reference.tokens("a0", asked[4], 16)
    for i, s in enumerate(streams):
        assert s.completion.token_ids == reference.tokens("a1" if i % 2 else None, asked[i], 200)
    record_property("hot_load_register_s", round(registered, 4))
    record_property("hot_load_first_token_s", round(first_token, 4))
    print(f"hot-load of the tiny demo adapter: registered in {registered * 1e3:.1f} ms, first token {first_token * 1e3:.1f} ms")


def test_kv_budget_holds_the_slots_first(world):
    """--kv-budget-gb pays for the LoRA slot buffers first; the KV plan says so."""
    plain = Engine.load(world.slots["gather"], threads=1, max_batch=8).kv_plan
    assert plain.slots is not None and plain.slot_bytes == plain.slots.nbytes > 0
    room = 3 * plain.row_bytes + plain.slot_bytes
    assert Engine.load(world.slots["gather"], threads=1, max_batch=8, kv_budget_gb=room / GIB).kv_plan.rows == 3
    assert Engine.load(world.slots["gather"], threads=1, max_batch=8, kv_budget_gb=(room - 1) / GIB).kv_plan.rows == 2
    text = plain.describe()
    assert text.startswith("KV cache: 8 rows x 2048 positions (float32), 2.0 MiB a row, 16.0 MiB in all; LoRA slots: 4 adapters")
    assert text.endswith(f"; {(plain.total_bytes + plain.slot_bytes) / 2**20:.1f} MiB with the KV rows")
    with pytest.raises(RequestError, match=r"a KV budget of 2\.5 MiB less 0\.5 MiB for the LoRA slots holds no row of 2048 "
                                           r"positions \(2\.0 MiB\); raise the KV budget or lower max_context, or fewer adapter slots"):
        Engine.load(world.slots["gather"], threads=1, kv_budget_gb=(plain.row_bytes + plain.slot_bytes - 1) / GIB)


def test_device_slot_buffers_are_written_in_place(world, reference, slot_exports):
    """The GPU path of the slot buffers, on the CPU provider: buffers ONNX Runtime allocated (not the host
    arrays), bound by address, each adapter copied into its slot's place by the copy graph. Through 2 slots
    and 4 adapters (slots rewritten as adapters take turns), every row decodes its merged export's tokens,
    the buffers end equal to the host slots, and no buffer ever moved."""
    engine = serving(slot_exports[2], world, max_batch=4)
    table = engine.adapters.table
    engine.slot_buffers = DeviceSlots(table, engine.runner)
    buffers = engine.slot_buffers.buffers
    addresses = {name: value.data_ptr() for name, value in buffers.items()}
    assert all(addresses[name] != table.buffers[name].ctypes.data for name in buffers)
    rows = ["a0", "a1", None, "a2", "a3", "a1"]
    asked = prompts(len(rows), seed=29)
    completions = engine.generate(asked, params(6), adapters=rows)
    for prompt, name, completion in zip(asked, rows, completions):
        assert completion.token_ids == reference.tokens(name, prompt, 6), name
    assert engine._admission.loads >= 4
    for name, value in buffers.items():
        assert value.data_ptr() == addresses[name]
        assert np.array_equal(value.numpy(), table.buffers[name])


def test_verify_adapters_checks_each_against_its_merged_model(world, tmp_path):
    """verify per adapter: every adapter through one multi-adapter engine (their prompts in one batch) against
    its own merged model in PyTorch: fp32 logits within 1e-4, identical greedy tokens, the eval set's accuracy
    on both sides, the report written into the converted folder. An adapter checked against another's merged
    model fails."""
    from loraship.export.evalset import EvalCase, write_eval
    from loraship.export.verify import AdapterCheck, verify_adapters

    converted = {name: shutil.copytree(world.converted[i], tmp_path / name) for i, name in enumerate(NAMES[:3])}
    write_eval(converted["a2"] / "eval.jsonl", [EvalCase.ask("What is 2 + 2?", "4"), EvalCase.ask("Name a colour.", "red")])
    merged = [world.root / f"merged-{i}" for i in range(4)]
    checks = {"a0": AdapterCheck(converted["a0"], merged[0]), "a2": AdapterCheck(converted["a2"], merged[2]),
              "wrong": AdapterCheck(converted["a1"], merged[3])}
    reports = verify_adapters(world.slots["gather"], checks, max_new_tokens=8, threads=1)
    for name in ("a0", "a2"):
        report = reports[name]
        assert report.passed and report.tokens_identical and report.max_abs_logit_diff < 1e-4, (name, report.failure)
        assert json.loads((converted[name] / "loraship.json").read_text())["verify"]["passed"] is True
    assert reports["a2"].eval is not None and len(reports["a2"].eval.engine.replies) == 2
    assert reports["a2"].eval.engine.replies == reports["a2"].eval.torch.replies
    assert reports["a0"].eval is None
    assert not reports["wrong"].passed and reports["wrong"].failure.startswith("max logit diff")
