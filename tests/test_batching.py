"""In-flight batched decode on a genai (GroupQueryAttention) export, on real ONNX Runtime sessions.

Every test compares against the same requests decoded alone: rows of different lengths, joining at
different steps, finishing early or cancelled, must not change one another's tokens.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from loraship.engine import Engine, RequestError, SamplingParams
from loraship.engine.kv_rows import step_widths
from loraship.engine.kv_rows_cache import KVPlan

PROMPTS = [
    "Hello, how are you today?",
    "Hi",
    "The quick brown fox jumps over the lazy dog, again and again and again",
    "LoRA adds small low-rank matrices",
    "Numbers: 1 2 3 4 5",
    "A",
]


@pytest.fixture(scope="module")
def engine(rows_engine) -> Engine:
    return rows_engine


def _alone(engine: Engine, prompt: str, params: SamplingParams) -> list[int]:
    [done] = engine.generate([prompt], params)
    return done.token_ids


def test_rows_joining_at_different_steps_equal_each_row_alone(engine):
    lengths = [24, 5, 30, 17]
    params = [SamplingParams(max_tokens=n) for n in lengths]
    alone = [_alone(engine, p, sp) for p, sp in zip(PROMPTS, params)]
    assert len({len(engine.encode(p)) for p in PROMPTS[:4]}) == 4  # four different prompt lengths

    batch = engine.new_batch()
    try:
        seqs = [engine.request(p, sp) for p, sp in zip(PROMPTS, params)]
        widths = []
        batch.add([seqs[0]])
        for step in range(20):
            if step == 2:
                batch.add([seqs[1], seqs[2]])  # join mid-flight, prompts of other lengths
            if step == 6:
                batch.add([seqs[3]])  # takes the row seqs[1] (5 tokens) gave back
            if batch:
                widths.append(max(batch.active) + 1)
                batch.step()
        while batch:
            batch.step()
    finally:
        batch.close()
    assert [s.completion.token_ids for s in seqs] == alone
    assert [s.completion.finish_reason for s in seqs] == ["length"] * 4
    assert max(widths) == 3  # the early finisher's row was reused: three rows covered four requests
    assert engine.kv.free == engine.kv.rows


def test_cancelled_row_leaves_at_once_and_others_are_unchanged(engine):
    params = SamplingParams(max_tokens=20)
    alone = [_alone(engine, p, params) for p in PROMPTS[:3]]
    batch = engine.new_batch()
    try:
        seqs = [engine.request(p, params) for p in PROMPTS[:3]]
        batch.add(seqs)
        for _ in range(4):
            batch.step()
        seqs[1].cancel()
        batch.step()  # the cancelled row leaves before this step runs: it computes nothing more
        assert len(batch) == 2 and engine.kv.free == engine.kv.rows - 2
        while batch:
            batch.step()
    finally:
        batch.close()
    assert seqs[1].completion.finish_reason == "cancelled"
    assert seqs[1].completion.token_ids == alone[1][: len(seqs[1].completion.token_ids)]
    assert len(seqs[1].completion.token_ids) == 5  # the prefill's token and four steps
    assert [seqs[0].completion.token_ids, seqs[2].completion.token_ids] == [alone[0], alone[2]]


def test_seeded_sampling_is_independent_of_neighbours(engine):
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = _alone(engine, PROMPTS[0], sampled)
    neighbours = [SamplingParams(max_tokens=n, temperature=1.3, seed=n) for n in (4, 16, 9)]
    together = engine.generate([PROMPTS[3], PROMPTS[0], PROMPTS[1], PROMPTS[2]], [neighbours[0], sampled, *neighbours[1:]])
    assert together[1].token_ids == alone
    assert together[1].token_ids != _alone(engine, PROMPTS[0], SamplingParams(max_tokens=16))  # really sampled


def test_more_requests_than_rows_wait_first_come_first_served(engine):
    params = [SamplingParams(max_tokens=n) for n in (12, 3, 20, 8, 15, 6)]
    alone = [_alone(engine, p, sp) for p, sp in zip(PROMPTS, params)]
    scheduler = engine.scheduler(start=False)  # all six queued before the first step
    started: list[int] = []
    events: list[tuple[str, int]] = []  # ("token" | "done", request) in the order the scheduler made them
    got: dict[int, list[int]] = {}
    done = threading.Event()
    lock = threading.Lock()

    def callbacks(i: int):
        def on_token(token: int, text: str, logprob) -> None:
            with lock:
                events.append(("token", i))
                if i not in started:
                    started.append(i)

        def on_done(completion, error) -> None:
            with lock:
                events.append(("done", i))
            got[i] = error or completion.token_ids
            if len(got) == len(PROMPTS):
                done.set()
        return on_token, on_done

    try:
        for i, (prompt, sp) in enumerate(zip(PROMPTS, params)):
            scheduler.submit(prompt, sp, *callbacks(i))
        scheduler.start()
        assert done.wait(60)
    finally:
        scheduler.close()
    assert [got[i] for i in range(len(PROMPTS))] == alone
    assert started[:4] == [0, 1, 2, 3] and sorted(started[4:]) == [4, 5]  # four rows: the first four went first
    # the rows run together: requests 1-3 stream tokens before request 0 (12 tokens) ends, and one step ran four
    first_done = events.index(("done", 0))
    assert all(events.index(("token", i)) < first_done for i in (1, 2, 3)), events
    assert sum(1 for kind, i in events[:first_done] if kind == "token" and i == 2) >= 3  # interleaved, not one after another
    assert scheduler.peak_active == 4
    assert engine.kv.free == engine.kv.rows


def test_close_fails_what_runs_and_waits_with_a_reason_and_the_thread_exits(onnx_dir):
    """One row, three long requests: close() while the first is decoding ends it and the two waiting with
    "shutting down" (each consumer told exactly once), returns within a step, ends the loop thread,
    gives the row back, and refuses later requests."""
    engine = Engine.load(onnx_dir, max_batch=1)
    before = set(threading.enumerate())
    scheduler = engine.scheduler()
    [loop] = [t for t in threading.enumerate() if t not in before and t.name == "loraship-scheduler"]
    ended: dict[int, list] = {0: [], 1: [], 2: []}
    tokens = {0: 0, 1: 0, 2: 0}
    streaming = threading.Event()
    finished = threading.Event()

    def callbacks(i: int):
        def on_token(token, text, logprob):
            tokens[i] += 1
            streaming.set()

        def on_done(completion, error):
            ended[i].append((completion, error))
            if all(ended.values()):
                finished.set()
        return on_token, on_done

    for i in range(3):
        scheduler.submit(PROMPTS[0], SamplingParams(max_tokens=1000, ignore_eos=True), *callbacks(i))
    assert streaming.wait(30)  # request 0 holds the row; 1 and 2 wait
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() hung"
    assert finished.wait(5)
    assert [len(ended[i]) for i in range(3)] == [1, 1, 1]  # each consumer hears once
    for i in range(3):
        [(completion, error)] = ended[i]
        assert completion is None and isinstance(error, RequestError) and "shutting down" in str(error), (i, completion, error)
    assert 0 < tokens[0] < 1000 and tokens[1] == tokens[2] == 0  # the first was cut short; the others never ran
    assert not loop.is_alive()
    assert engine.kv.free == 1
    with pytest.raises(RequestError, match="shutting down"):
        scheduler.submit(PROMPTS[0], SamplingParams(max_tokens=2))


def test_one_batch_owns_the_rows(engine):
    scheduler = engine.scheduler()
    try:
        with pytest.raises(RequestError, match="in use by a running scheduler"):
            engine.generate([PROMPTS[0]], SamplingParams(max_tokens=2))
    finally:
        scheduler.close()
    assert len(engine.generate([PROMPTS[0]], SamplingParams(max_tokens=2))[0].token_ids) == 2


def test_kv_plan_from_batch_or_budget(engine):
    layout = engine.runner.layout
    per_position = len(layout.past_names) * layout.kv_heads * layout.head_dim * 4  # fp32
    assert engine.kv_plan == KVPlan(4, engine.max_context, per_position, "float32")
    assert engine.kv.buffers[0].shape() == [4, layout.kv_heads, engine.max_context, layout.head_dim]
    row = per_position * 100
    assert KVPlan.of(layout, 100, max_batch=8, budget_bytes=3 * row + 5).rows == 3
    assert KVPlan.of(layout, 100, max_batch=2, budget_bytes=30 * row).rows == 2
    with pytest.raises(RequestError, match="holds no row of 100 positions"):
        KVPlan.of(layout, 100, max_batch=8, budget_bytes=row - 1)
    assert engine.kv_plan.describe() == "KV cache: 4 rows x 2048 positions (float32), 2.0 MiB a row, 8.0 MiB in all"
    assert KVPlan(8, 4096, 393216, "float16").describe() == (  # Phi-3-mini: 32 layers x K,V x 32 heads x 96 x fp16
        "KV cache: 8 rows x 4096 positions (float16), 1.50 GiB a row, 12.00 GiB in all")


def test_budget_sizes_the_engine(onnx_dir):
    layout_probe = Engine.load(onnx_dir, max_batch=1, max_context=256)
    row_gb = layout_probe.kv_plan.row_bytes / 1024**3
    engine = Engine.load(onnx_dir, max_batch=16, max_context=256, kv_budget_gb=row_gb * 3.5)
    assert engine.max_batch == engine.kv.rows == 3


def test_step_widths():
    assert step_widths(4, cuda_graph=False) == [1, 2, 3, 4]
    assert step_widths(8, cuda_graph=True) == [1, 2, 4, 8]
    assert step_widths(6, cuda_graph=True) == [1, 2, 4, 6]
    assert step_widths(1, cuda_graph=True) == [1]


def test_width_covers_highest_active_row_with_dummies_below(engine):
    """A free row below the highest active one decodes a dummy; its neighbours are unaffected."""
    params = SamplingParams(max_tokens=10)
    alone = _alone(engine, PROMPTS[2], params)
    batch = engine.new_batch()
    try:
        first, second = engine.request(PROMPTS[1], SamplingParams(max_tokens=1)), engine.request(PROMPTS[2], params)
        batch.add([first, second])  # the first finishes at once: row 0 free, row 1 active
        assert list(batch.active) == [1]
        while batch:
            batch.step()
    finally:
        batch.close()
    assert second.completion.token_ids == alone
    assert np.count_nonzero(batch.mask[0]) == 1  # the free row holds a one-position dummy


def test_optimum_rows_join_and_leave_with_kv_edits_on_the_provider(optimum_dir):
    """The fallback export's growing cache: joining pads and concatenates, leaving gathers and trims,
    both as ONNX Runtime graphs on the decoder's provider; every row's tokens equal it decoded alone."""
    engine = Engine.load(optimum_dir, max_batch=3)
    assert engine.kv is None and engine.kv_ops is not None
    lengths = [14, 4, 22, 9]
    params = [SamplingParams(max_tokens=n) for n in lengths]
    alone = [_alone(engine, p, sp) for p, sp in zip(PROMPTS, params)]
    batch = engine.new_batch()
    seqs = [engine.request(p, sp) for p, sp in zip(PROMPTS, params)]
    batch.add(seqs[:2])
    for step in range(30):
        if step == 3:
            batch.add([seqs[2]])  # a longer prompt joins: the cache is re-padded to its width
        if step == 5:
            assert batch.room == 1  # seqs[1] left after 4 tokens
            batch.add([seqs[3]])
        if batch:
            batch.step()
    assert not batch
    assert [s.completion.token_ids for s in seqs] == alone


def test_kv_ops_merge_and_select_match_numpy(optimum_dir):
    from loraship.engine.kv_grown_ops import KVGrownOps

    engine = Engine.load(optimum_dir)
    layout = engine.runner.layout
    rng = np.random.default_rng(0)
    count = len(layout.past_names)
    old = [rng.standard_normal((2, layout.kv_heads, 5, layout.head_dim)).astype(np.float32) for _ in range(count)]
    new = [rng.standard_normal((1, layout.kv_heads, 3, layout.head_dim)).astype(np.float32) for _ in range(count)]
    ops = KVGrownOps(engine.runner)
    merged = ops.merge(old, new, 7)
    for o, n, m in zip(old, new, merged):
        expected = np.concatenate([np.pad(o, [(0, 0), (0, 0), (2, 0), (0, 0)]), np.pad(n, [(0, 0), (0, 0), (4, 0), (0, 0)])])
        np.testing.assert_array_equal(m, expected)
    selected = ops.select(merged, [2, 0], 3)
    for m, s in zip(merged, selected):
        np.testing.assert_array_equal(s, m[[2, 0]][:, :, 3:])


def test_last_position_logits_are_sliced_and_cast_beside_the_decoder(onnx_dir):
    """On a GPU a prompt's logits stay on the device and only the last position crosses to the host;
    the graph that does it runs here on the CPU provider, on fp16 and fp32 logits."""
    import onnxruntime as ort

    from loraship.engine.devgraph import ONNX_TYPES, last_position_graph, providers_beside, session_beside

    engine = Engine.load(onnx_dir)
    logits = np.random.default_rng(0).standard_normal((2, 5, engine.runner.layout.vocab)).astype(engine.runner.layout.logits_dtype)
    last = engine.runner.last_logits(ort.OrtValue.ortvalue_from_numpy(logits))
    assert last.dtype == np.float32 and last.shape == (2, logits.shape[-1])
    np.testing.assert_array_equal(last, logits[:, -1].astype(np.float32))
    half = logits.astype(np.float16)
    session = session_beside(engine.runner.session, last_position_graph(ONNX_TYPES[np.dtype(np.float16)]))
    [out] = session.run(None, {"logits": half})
    np.testing.assert_array_equal(out[:, 0], half[:, -1].astype(np.float32))

    class TensorRTDecoder:  # what a session on the TensorRT EP reports
        def get_providers(self):
            return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_provider_options(self):
            return {"TensorrtExecutionProvider": {"trt_fp16_enable": "1"},
                    "CUDAExecutionProvider": {"device_id": "1", "enable_cuda_graph": "1"}}

    # no TensorRT (an engine per shape) and no CUDA graph capture (each run has new shapes and addresses)
    assert providers_beside(TensorRTDecoder()) == [("CUDAExecutionProvider", {"device_id": "1", "enable_cuda_graph": "0"}),
                                                   ("CPUExecutionProvider", {})]


def test_a_request_status_follows_it_from_the_queue_to_its_end(engine):
    """Waiting, then prefilling (a long prompt, in chunks) or running, then finished as it ended: its
    length, its consumer's cancel, or its own error; the finish reason is what the model sends."""
    from loraship.engine import FinishReason, RequestStatus

    def broken(*_):
        raise ValueError("the consumer broke")

    capped = engine.request(PROMPTS[0], SamplingParams(max_tokens=3))
    cancelled = engine.request(PROMPTS[1], SamplingParams(max_tokens=20))
    long = engine.request(" projections" * 300, SamplingParams(max_tokens=2))
    failed = engine.request(PROMPTS[2], SamplingParams(max_tokens=20), on_token=broken)
    requests = [capped, cancelled, long, failed]
    assert [r.status for r in requests] == [RequestStatus.WAITING] * 4
    batch = engine.new_batch()
    try:
        batch.add(requests)
        assert [r.status for r in requests[:3]] == [RequestStatus.RUNNING, RequestStatus.RUNNING, RequestStatus.PREFILLING]
        cancelled.cancel()
        while batch:
            batch.step()
    finally:
        batch.close()
    assert [r.status for r in requests] == [RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_ABORTED,
                                            RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_ERROR]
    assert [r.completion.finish_reason for r in requests] == ["length", "cancelled", "length", "cancelled"]
    assert capped.completion.finish_reason is FinishReason.LENGTH and f"{FinishReason.EOS}" == str(FinishReason.EOS) == "eos"
    assert "the consumer broke" in str(failed.error)


def test_a_request_for_an_adapter_is_refused_by_a_model_without_them(engine):
    with pytest.raises(RequestError, match="this model serves no adapters, so adapter 'sql' cannot be chosen"):
        engine.request(PROMPTS[0], SamplingParams(max_tokens=2), adapter="sql")
