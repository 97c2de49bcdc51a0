"""Many adapters from one endpoint (issue 19), on one real tritonserver with the real OpenAI frontend in front
(API key on), as `loraship serve` runs them: the tiny phi3 ``lora_worlds`` base exported with 2 LoRA slots,
three adapters installed with ``add_adapter`` (more than the slots) and a fourth hot-loaded. Clients are the
``openai`` package and tritonclient; each answer is compared with its adapter's merged export run alone
through the engine (greedy). The tests share the server and run in file order (the set changes as they go)."""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from loraship_contract import API_KEY_HEADER, GRPC_API_KEY_HEADER

from loraship.engine import Engine, SamplingParams
from loraship.triton_repo.adapters import add_adapter, list_adapters
from loraship.triton_repo.config import ModelOptions
from loraship.triton_repo.frontend import OpenAIFrontend
from loraship.triton_repo.layout import write_version
from loraship.triton_repo.server import TritonServer

KEY = "multi-lora-key-3b9f21"
MODEL = "multi"
PLAIN = "plain"  # the base exported without slots, beside it
NAMES = ["a0", "a1", "a2", "a3"]  # world.converted / world.merged by index
INSTALLED = NAMES[:3]  # at start: three adapters on two slots; a3 is hot-loaded
MAX_TOKENS = 12
PROMPTS = ["The quick brown fox", "Numbers: 0 1 2 3", "Hello, how are you today?", "LoRA adds small low-rank matrices"]
HEADERS = {"Content-Type": "application/json", API_KEY_HEADER: KEY}


@pytest.fixture(scope="module")
def world(lora_worlds):
    return lora_worlds("phi3")


class Expected:
    """Greedy text of a prompt on an adapter's merged export (None: the base's export), run alone in-process."""

    def __init__(self, world) -> None:
        self.world, self.engines, self.cache = world, {}, {}

    def __call__(self, adapter: str | None, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
        key = (adapter, prompt, max_tokens)
        if key not in self.cache:
            if adapter not in self.engines:
                folder = self.world.base_onnx if adapter is None else self.world.merged[NAMES.index(adapter)]
                self.engines[adapter] = Engine.load(folder, threads=1, max_batch=1)
            [done] = self.engines[adapter].generate([prompt], SamplingParams(max_tokens=max_tokens))
            self.cache[key] = done.text
        return self.cache[key]


@pytest.fixture(scope="module")
def expected(world) -> Expected:
    return Expected(world)


class Endpoint:
    def __init__(self, triton: TritonServer, frontend: OpenAIFrontend, repo: Path) -> None:
        self.triton, self.frontend, self.repo = triton, frontend, repo

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.frontend.url, api_key=KEY, max_retries=0, timeout=120)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{self.frontend.root}{path}", content=json.dumps(body).encode(), timeout=120, headers=HEADERS)

    def models(self) -> dict[str, dict]:
        response = httpx.get(f"{self.frontend.url}/models", headers=HEADERS, timeout=30)
        assert response.status_code == 200, response.text
        return {card["id"]: card for card in response.json()["data"]}

    def complete(self, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
        return self.openai().completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def endpoint(world, tmp_path_factory):
    from loraship.export.lora_slots import add_lora_slots

    root = tmp_path_factory.mktemp("multi-lora")
    slots = add_lora_slots(world.base_onnx, root / "slots-2", max_adapters=2, max_rank=8)
    repo = root / "repo"
    write_version(slots, repo, ModelOptions(name=MODEL, max_batch_size=8, threads=1))
    write_version(world.base_onnx, repo, ModelOptions(name=PLAIN, max_batch_size=2, threads=1))
    for name in INSTALLED:
        add_adapter(repo, MODEL, name, world.converted[NAMES.index(name)])
    with TritonServer(repo, api_key=KEY, ready_timeout=120) as triton, \
            OpenAIFrontend(triton.http_url, api_key=KEY, repository=repo) as frontend:
        yield Endpoint(triton, frontend, repo)
        log = triton.log_path.read_text(errors="replace")
    assert "Traceback" not in log


def test_models_lists_the_base_and_each_adapter_with_its_parent(endpoint):
    cards = endpoint.models()
    assert sorted(cards) == sorted([MODEL, PLAIN, *INSTALLED])
    created = cards[MODEL]["created"]
    for base in (MODEL, PLAIN):
        assert cards[base] == {"id": base, "object": "model", "created": created, "owned_by": "loraship", "root": base, "parent": None}
    for name in INSTALLED:
        assert cards[name] == {"id": name, "object": "model", "created": created, "owned_by": "loraship", "root": name, "parent": MODEL}
    client = endpoint.openai()
    assert sorted(m.id for m in client.models.list()) == sorted(cards)
    assert client.models.retrieve("a1").to_dict()["parent"] == MODEL


def test_mixed_concurrent_requests_by_model(endpoint, expected):
    """Requests on the base and three adapters (two slots) at once, streamed and not: each answer is its
    adapter's merged export's greedy text."""
    jobs = [(model, prompt, stream) for model in [MODEL, *INSTALLED] for prompt in PROMPTS[:2] for stream in (False, True)]
    want = {(m, p): expected(None if m == MODEL else m, p) for m, p, _ in jobs}
    assert len({want[(m, PROMPTS[0])] for m in [MODEL, *INSTALLED]}) == 4  # each adapter really changes the answer

    def run(job) -> str:
        model, prompt, stream = job
        client = endpoint.openai()
        if not stream:
            return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        chunks = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    assert got == [want[(m, p)] for m, p, _ in jobs]
    chat = endpoint.openai().chat.completions.create(model="a2", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "a2"


def test_unknown_name_is_404_never_the_base(endpoint):
    client = endpoint.openai()
    for call in (lambda: client.completions.create(model="nope", prompt="Hi", max_tokens=4),
                 lambda: client.completions.create(model="nope", prompt="Hi", max_tokens=4, stream=True),
                 lambda: client.chat.completions.create(model="org/nope", messages=[{"role": "user", "content": "Hi"}]),
                 lambda: client.models.retrieve("nope")):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.code == "model_not_found", caught.value.body


def direct_generate(endpoint, body: dict) -> tuple[int, dict]:
    response = httpx.post(f"{endpoint.triton.http_url}/v2/models/{MODEL}/generate", json=body, headers={API_KEY_HEADER: KEY}, timeout=60)
    return response.status_code, response.json()


def test_triton_clients_choose_the_adapter_by_lora_name(endpoint, expected, calls):
    """Triton's vLLM-backend convention: ``lora_name`` in sampling_parameters (gRPC stream and HTTP generate, as
    tritonclient and genai-perf send it), or the request parameter ``lora_name``."""
    prompt = PROMPTS[2]
    sampling = json.dumps({"max_tokens": MAX_TOKENS, "lora_name": "a1"})
    fields = {"text_input": np.array([prompt.encode()], np.object_), "sampling_parameters": np.array([sampling.encode()], np.object_)}
    events = calls.grpc_stream(endpoint.triton.grpc_url, MODEL, fields, headers={GRPC_API_KEY_HEADER: KEY})
    assert "".join(e["text_output"] for e in events) == expected("a1", prompt)
    status, answer = direct_generate(endpoint, {"text_input": prompt, "sampling_parameters": sampling})
    assert status == 200 and answer["text_output"] == expected("a1", prompt)
    for body in ({"text_input": prompt, "max_tokens": MAX_TOKENS, "lora_name": "a2"},
                 {"text_input": prompt, "max_tokens": MAX_TOKENS, "parameters": {"lora_name": "a2"}}):
        status, answer = direct_generate(endpoint, body)
        assert status == 200 and answer["text_output"] == expected("a2", prompt), answer
    status, answer = direct_generate(endpoint, {"text_input": prompt, "max_tokens": MAX_TOKENS, "sampling_parameters": "{}"})
    assert answer["text_output"] == expected(None, prompt)  # no lora_name: the base
    status, answer = direct_generate(endpoint, {"text_input": prompt, "sampling_parameters": json.dumps({"lora_name": "nope"})})
    assert status == 400 and "adapter 'nope' is not served by this model" in answer["error"], answer
    response = httpx.post(f"{endpoint.triton.http_url}/v2/models/{PLAIN}/generate", headers={API_KEY_HEADER: KEY}, timeout=60,
                          json={"text_input": prompt, "sampling_parameters": json.dumps({"lora_name": "a1"})})
    assert response.status_code == 400 and response.json()["error"] == \
        "this model serves no adapters, so adapter 'a1' cannot be chosen; leave it out"
    status, answer = direct_generate(endpoint, {"text_input": prompt, "lora_name": "a1",
                                                "sampling_parameters": json.dumps({"lora_name": "a2"})})
    assert status == 400 and "name different adapters" in answer["error"], answer
    # through the frontend's /v2 too (its generate checks let the parameter pass)
    for body in ({"text_input": prompt, "max_tokens": MAX_TOKENS, "parameters": {"lora_name": "a2"}},
                 {"text_input": prompt, "max_tokens": MAX_TOKENS, "lora_name": "a2"}):
        response = httpx.post(f"{endpoint.frontend.root}/v2/models/{MODEL}/generate", headers=HEADERS, timeout=60, json=body)
        assert response.status_code == 200 and response.json()["text_output"] == expected("a2", prompt), response.text
    response = httpx.post(f"{endpoint.frontend.root}/v2/models/{MODEL}/generate", headers=HEADERS, timeout=60,
                          json={"text_input": prompt, "lora_name": 7})
    assert response.status_code == 400 and response.json() == {"error": "lora_name must be an adapter's name (a string), not 7"}


def test_load_and_unload_need_the_key(endpoint, world):
    body = {"lora_name": "x", "lora_path": str(world.converted[3])}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        for headers in ({"Content-Type": "application/json"}, {"Content-Type": "application/json", API_KEY_HEADER: "wrong"}):
            response = httpx.post(f"{endpoint.frontend.root}{path}", json=body, headers=headers, timeout=30)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert "x" not in list_adapters(endpoint.repo, MODEL)


def test_hot_load_while_streams_run(endpoint, expected, world, record_property):
    """a3 is loaded while streams on the base and the other adapters run: every stream finishes with its own
    tokens, the load answers once the model serves a3 (<= 1 s), and a3 then answers as its merged export."""
    long = 48
    streams = [(m, PROMPTS[3]) for m in (MODEL, "a0", "a1", "a2")]
    want = [expected(None if m == MODEL else m, p, long) for m, p in streams]
    results: list[str | None] = [None] * len(streams)
    started = threading.Barrier(len(streams) + 1)

    def stream(i: int) -> None:
        model, prompt = streams[i]
        chunks = endpoint.openai().completions.create(model=model, prompt=prompt, max_tokens=long, temperature=0, stream=True)
        text, first = "", True
        for chunk in chunks:
            if first:
                first = False
                started.wait()
            text += "".join(c.text for c in chunk.choices)
        results[i] = text

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    begin = time.perf_counter()
    response = endpoint.post("/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": str(world.converted[3])})
    took = time.perf_counter() - begin
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'a3' added successfully.", response.text
    assert endpoint.complete("a3", PROMPTS[0]) == expected("a3", PROMPTS[0])
    for t in threads:
        t.join(timeout=120)
    assert results == want
    assert took <= 1.0, took
    assert endpoint.models()["a3"]["parent"] == MODEL
    assert list_adapters(endpoint.repo, MODEL)["a3"] == endpoint.repo / MODEL / "adapters" / "a3"
    record_property("hot_load_s", round(took, 3))


def test_load_refusals(endpoint, world, tmp_path):
    for body, status, needle in (
        ({"lora_name": "a3", "lora_path": str(world.converted[3])}, 400, "The lora adapter 'a3' has already been loaded."),
        ({"lora_name": MODEL, "lora_path": str(world.converted[3])}, 400, f"The lora adapter '{MODEL}' has already been loaded."),
        ({"lora_name": "p", "lora_path": str(world.adapters[1])}, 400, "is a peft adapter, not a converted one (convert it first: `loraship convert-adapter"),
        ({"lora_name": "m", "lora_path": str(tmp_path / "missing")}, 404, "is not a folder"),
        ({"lora_name": "", "lora_path": str(world.converted[1])}, 400, "Both 'lora_name' and 'lora_path' must be provided."),
        ({"lora_name": "../x", "lora_path": str(world.converted[1])}, 400, "adapter name '../x' is not valid"),
        ({"lora_name": 5, "lora_path": str(world.converted[1])}, 400, "lora_name: Input should be a valid string"),
        ({"lora_name": "y", "lora_path": str(world.converted[1]), "model": PLAIN}, 400, f"model `{PLAIN}` has no LoRA slots"),
        ({"lora_name": "y", "lora_path": str(world.converted[1]), "model": "nope"}, 404, "The model `nope` does not exist"),
    ):
        response = endpoint.post("/v1/load_lora_adapter", body)
        assert response.status_code == status and needle in response.json()["error"]["message"], response.text
    response = httpx.post(f"{endpoint.frontend.root}/v1/load_lora_adapter", content=b"lora_name=x", timeout=30,
                          headers={API_KEY_HEADER: KEY, "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415  # the edge's rules hold here too
    assert sorted(list_adapters(endpoint.repo, MODEL)) == NAMES


def test_a_damaged_adapter_is_refused_by_the_model_and_the_others_serve(endpoint, world, tmp_path, expected):
    """The frontend installs it; the model checks every byte, refuses it in one log line, and the load is a 400
    with the model's reason (the entry is taken back)."""
    import shutil

    damaged = shutil.copytree(world.converted[1], tmp_path / "damaged")
    weights = damaged / "adapter_slots.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    weights.write_bytes(bytes(data))
    response = endpoint.post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(damaged)})
    assert response.status_code == 400 and "Loading lora bad failed" in response.text and "sha256" in response.text, response.text
    assert "bad" not in list_adapters(endpoint.repo, MODEL) and "bad" not in endpoint.models()
    assert endpoint.complete("a1", PROMPTS[0]) == expected("a1", PROMPTS[0])
    log = endpoint.triton.log_path.read_text(errors="replace")
    assert sum("adapter bad not loaded" in line for line in log.splitlines()) >= 1


def test_a_hugging_face_style_name(endpoint, world, expected):
    """An adapter named like a Hub repo (``org/name``): its folder is percent-encoded, the name routes as given."""
    response = endpoint.post("/v1/load_lora_adapter", {"lora_name": "acme/a1-v2", "lora_path": str(world.converted[1])})
    assert response.status_code == 200, response.text
    assert (endpoint.repo / MODEL / "adapters" / "acme%2Fa1-v2").is_dir()
    assert endpoint.complete("acme/a1-v2", PROMPTS[1]) == expected("a1", PROMPTS[1])
    assert endpoint.openai().models.retrieve("acme/a1-v2").to_dict()["parent"] == MODEL
    assert endpoint.post("/v1/unload_lora_adapter", {"lora_name": "acme/a1-v2"}).status_code == 200
    assert "acme/a1-v2" not in endpoint.models()


def test_residency_more_adapters_than_slots(endpoint, expected):
    """Four adapters on two slots and the base, two requests each, all at once: every answer is correct."""
    jobs = [(m, p) for m in [MODEL, *NAMES] for p in PROMPTS[:2]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: endpoint.complete(*job), jobs))
    assert got == [expected(None if m == MODEL else m, p) for m, p in jobs]


def test_unload_lets_running_requests_finish_then_404(endpoint, expected):
    long = 48
    result: list[str] = []
    first = threading.Event()

    def stream() -> None:
        chunks = endpoint.openai().completions.create(model="a0", prompt=PROMPTS[1], max_tokens=long, temperature=0, stream=True)
        text = ""
        for chunk in chunks:
            first.set()
            text += "".join(c.text for c in chunk.choices)
        result.append(text)

    thread = threading.Thread(target=stream)
    thread.start()
    assert first.wait(60)
    response = endpoint.post("/v1/unload_lora_adapter", {"lora_name": "a0"})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'a0' removed successfully.", response.text
    assert "a0" not in endpoint.models()
    with pytest.raises(openai.NotFoundError) as caught:
        endpoint.complete("a0", PROMPTS[0])
    assert caught.value.code == "model_not_found"
    thread.join(120)
    assert result == [expected("a0", PROMPTS[1], long)]  # the running stream finished on a0
    response = endpoint.post("/v1/unload_lora_adapter", {"lora_name": "a0"})
    assert response.status_code == 404 and response.json()["error"]["message"] == "The lora adapter 'a0' cannot be found."
    assert "a0" not in list_adapters(endpoint.repo, MODEL) and not (endpoint.repo / MODEL / "adapters" / "a0").exists()


def test_hot_load_time(endpoint, world, record_property):
    """Load and unload the demo adapter (rank 8, every projection) five times: the median load <= 1 s (it is
    bounded by the model's 0.25 s poll of multi_lora.json)."""
    times = []
    with httpx.Client(base_url=endpoint.frontend.root, headers=HEADERS, timeout=120) as client:  # (a new client costs ~0.1 s)
        for _ in range(5):
            begin = time.perf_counter()
            response = client.post("/v1/load_lora_adapter", json={"lora_name": "timed", "lora_path": str(world.converted[0])})
            times.append(time.perf_counter() - begin)
            assert response.status_code == 200, response.text
            assert client.post("/v1/unload_lora_adapter", json={"lora_name": "timed"}).status_code == 200
    record_property("hot_load_times_s", [round(t, 3) for t in times])
    print(f"hot-load times (s): {[round(t, 3) for t in times]}, median {statistics.median(times):.3f}")
    assert statistics.median(times) <= 1.0, times


def test_without_a_key_loading_is_refused_on_a_public_address(world):
    """No key and a public address: load and unload are 403 before anything is read (the app in-process)."""
    import asyncio

    from loraship.triton_repo.runtime.openai_frontend.app import create_app

    async def go() -> list[httpx.Response]:
        app = create_app("http://127.0.0.1:9", None, repository=str(world.root), host="0.0.0.0")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.post(path, json={"lora_name": "x", "lora_path": str(world.converted[0])})
                    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")]

    for response in asyncio.run(go()):
        assert response.status_code == 403 and "needs an API key on a public address" in response.json()["error"]["message"]


def test_a_crashed_model_is_a_503_for_its_adapters_too(endpoint):
    """Last in the file (it leaves the model down): kill -9 of the model's python stub. Its adapters' names stay
    routed to it, so a request on one is the model's 503 with Retry-After, not a 404 for a name that is served."""
    import psutil

    assert "a1" in endpoint.models()
    stubs = [p for p in psutil.Process(endpoint.triton.process.pid).children(recursive=True) if f"{MODEL}_0_0" in p.cmdline()]
    assert len(stubs) == 1
    stubs[0].kill()
    deadline = time.monotonic() + 30
    while stubs[0].is_running() and stubs[0].status() != psutil.STATUS_ZOMBIE:  # tritonserver's child: it reaps it, or not
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.5)  # past the names' cache: they are asked for again, and the model does not answer
    for model in ("a1", MODEL):
        with pytest.raises(openai.InternalServerError) as caught:
            endpoint.complete(model, PROMPTS[0])
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "5", caught.value.body
    endpoint.triton.stop(timeout=2)  # a dead stub's model never unloads: no 30 s graceful exit at teardown
