"""The OpenAI-compatible API with the official ``openai`` package as the client, against the frontend in
front of a real tritonserver; replies are checked against the in-process engine on the same export."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from .conftest import API_KEY, CONVERSATION, MAX_TOKENS, MODEL, RAW_MODEL

PROMPT = "The quick brown fox"


def test_models_list_and_retrieve(chat_server):
    client = chat_server.openai()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, RAW_MODEL] and {m.object for m in models} == {"model"}
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.body["code"] == "model_not_found"


def test_chat_completion_equals_the_engine_and_counts_usage_after_the_template(chat_server, chat_ids, greedy):
    ids = chat_ids(CONVERSATION)
    expected = greedy(ids)
    reply = chat_server.openai().chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" == {"length": "length"}[expected.finish_reason]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), expected.completion_tokens)
    assert reply.usage.total_tokens == len(ids) + expected.completion_tokens


def test_chat_stream_text_equals_the_non_streamed_text(chat_server):
    client = chat_server.openai()
    whole = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_completion_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_completion_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert {c.id for c in chunks} == {chunks[0].id}


def test_stream_is_server_sent_events_ending_in_done(chat_server):
    body = {"model": MODEL, "messages": CONVERSATION[1:2], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{chat_server.frontend.url}/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_completions_stream_and_not_equal_tritons_text_generate(chat_server, greedy):
    client = chat_server.openai()
    expected = greedy(PROMPT)
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == expected.text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    echoed = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=MAX_TOKENS, echo=True)
    assert echoed.choices[0].text == PROMPT + expected.text


def test_stop_seed_and_sampling_parameters_reach_the_model(chat_server, chat_ids, greedy):
    client = chat_server.openai()
    messages = CONVERSATION[1:2]
    full = greedy(chat_ids(messages)).text
    stop = next(w for w in full.split()[2:] if w.isalnum() and full.count(w) == 1)
    stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stop=stop)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop)]  # cut right before the stop string
    sampled = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first = client.chat.completions.create(**sampled).choices[0].message.content
    assert first == client.chat.completions.create(**sampled).choices[0].message.content
    assert first == greedy(chat_ids(messages), temperature=0.9, top_p=0.9, seed=7).text
    assert client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3).usage.completion_tokens == 3


def test_n_choices_are_n_requests_sampled_with_seed_plus_i(chat_server, chat_ids, greedy):
    """n=3 with a seed: choice i is what the engine samples with seed + i; streamed choices interleave by
    index and reassemble to the same texts; usage counts the prompt once and every choice's tokens."""
    client = chat_server.openai()
    messages = CONVERSATION[1:2]
    ids = chat_ids(messages)
    request = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.9, "seed": 7, "n": 3}
    expected = [greedy(ids, temperature=0.9, seed=7 + i) for i in range(3)]
    assert len({e.text for e in expected}) > 1  # the seeds make different choices
    reply = client.chat.completions.create(**request)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [e.text for e in expected]
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == sum(e.completion_tokens for e in expected)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    texts, finishes = ["", "", ""], [[], [], []]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert texts == [e.text for e in expected] and finishes == [[c.finish_reason] for c in reply.choices]
    assert chunks[-1].usage == reply.usage
    greedy_pair = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, n=2, best_of=2)
    assert [c.text for c in greedy_pair.choices] == [greedy(PROMPT).text] * 2
    assert greedy_pair.usage.completion_tokens == 2 * greedy(PROMPT).completion_tokens
    with pytest.raises(openai.BadRequestError, match="best_of other than n"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2, best_of=3)


def test_logprobs_are_the_engines_in_openais_chat_and_completions_shapes(chat_server, chat_ids, greedy):
    """Chat: logprobs.content with each token's bytes and top_logprobs, streamed or not; completions:
    tokens, token_logprobs, top_logprobs as {token: logprob} and text_offset, streamed or not."""
    client = chat_server.openai()
    messages = CONVERSATION[1:2]
    expected = greedy(chat_ids(messages), logprobs=3)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == [e.text for e in expected.logprobs]
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 3 for c in content)
    assert [[t.token for t in c.top_logprobs] for c in content] == [[text for _, text, _ in e.top] for e in expected.logprobs]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [c for chunk in chunks for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4).choices[0].logprobs is None

    plain = greedy(PROMPT, logprobs=2)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [e.text for e in plain.logprobs]
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in plain.logprobs], abs=1e-5)
    assert logprobs.top_logprobs[0] == pytest.approx({text: value for _, text, value in plain.logprobs[0].top}, abs=1e-5)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=2, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for part in parts for t in part.tokens] == logprobs.tokens
    assert [o for part in parts for o in part.text_offset] == logprobs.text_offset
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logprobs with echo are not streamed"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=1, echo=True, stream=True)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=21)
    assert info.value.body["param"] == "logprobs"


def test_lm_eval_loglikelihood_requests_score_the_prompt(chat_server, engine):
    """What lm-evaluation-harness's local-completions model sends for loglikelihood: token-id prompts
    (one list per request in a batch), echo, logprobs=1, max_tokens=1, temperature 0; it sums
    token_logprobs[ctxlen:-1] and checks each against max(top_logprobs). Both equal the engine's."""
    from loraship.engine import SamplingParams

    client = chat_server.openai()
    contexts = ["The capital of France is", "Two plus two equals"]
    continuations = [" Paris", " four"]
    prompts = [engine.encode(c + x) for c, x in zip(contexts, continuations)]
    ctxlens = [len(engine.encode(c)) for c in contexts]
    reply = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, ids, ctxlen in zip(reply.choices, prompts, ctxlens):
        [expected] = engine.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1, logprobs=1))
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        scored = logprobs.token_logprobs[ctxlen:-1]
        assert scored == pytest.approx([e.logprob for e in expected.prompt_logprobs[ctxlen:]], abs=1e-5)
        assert logprobs.top_logprobs[ctxlen:-1] == [pytest.approx({text: v for _, text, v in e.top}, abs=1e-5)
                                                    for e in expected.prompt_logprobs[ctxlen:]]  # what lm-eval's is_greedy reads
        assert logprobs.tokens[1:-1] == [e.text for e in expected.prompt_logprobs[1:]]
        assert logprobs.token_logprobs[-1] == pytest.approx(expected.logprobs[0].logprob, abs=1e-5)
        assert choice.text == engine.tokenizer.decode(ids, skip_special_tokens=False) + expected.text
    assert reply.usage.prompt_tokens == sum(len(p) for p in prompts) and reply.usage.completion_tokens == 2
    text = client.completions.create(model=MODEL, prompt=contexts[0], echo=True, logprobs=0, max_tokens=1, temperature=0)
    assert text.choices[0].text.startswith(contexts[0]) and text.choices[0].logprobs.token_logprobs[0] is None
    scored = client.completions.create(model=MODEL, prompt=prompts[0], echo=True, logprobs=1, max_tokens=0)  # score only
    assert scored.choices[0].logprobs.token_logprobs == reply.choices[0].logprobs.token_logprobs[:-1]
    assert scored.usage.completion_tokens == 0 and scored.choices[0].text == engine.tokenizer.decode(prompts[0], skip_special_tokens=False)
    with pytest.raises(openai.BadRequestError, match="max_tokens 0 only scores the prompt"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.completions.create(model=MODEL, prompt=[], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="not in the model's vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 10**7], max_tokens=1)


def test_errors_come_in_openais_shape_with_the_right_status(chat_server):
    client = chat_server.openai()
    cases = [
        (dict(model="nope"), openai.NotFoundError, "model", "model_not_found"),
        (dict(model="../repository/index"), openai.NotFoundError, "model", "model_not_found"),
        (dict(max_tokens=100_000), openai.BadRequestError, None, "context_length_exceeded"),
        (dict(messages=[{"role": "user", "content": "hello " * 3000}]), openai.BadRequestError, None, "context_length_exceeded"),
        (dict(temperature=-1), openai.BadRequestError, "temperature", None),
        (dict(top_p=1.5), openai.BadRequestError, "top_p", None),
        (dict(max_tokens=0), openai.BadRequestError, "max_tokens", None),
        (dict(n=129), openai.BadRequestError, "n", None),
        (dict(messages=[]), openai.BadRequestError, "messages", None),
        (dict(model=RAW_MODEL), openai.BadRequestError, None, None),
    ]
    for override, error, param, code in cases:
        request = {"model": MODEL, "messages": CONVERSATION[1:2], "max_tokens": 4, **override}
        with pytest.raises(error) as info:
            client.chat.completions.create(**request)
        body = info.value.body
        assert body["type"] == "invalid_request_error" and body["message"], body
        assert (body["param"], body["code"]) == (param, code), (override, body)
    assert "no chat template" in info.value.body["message"]  # the RAW_MODEL case
    with pytest.raises(openai.BadRequestError, match="stream_options needs stream"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream_options={"include_usage": True})
    auth = {"Authorization": f"Bearer {API_KEY}"}
    broken = httpx.post(f"{chat_server.frontend.url}/chat/completions", content=b"{not json", timeout=30,
                        headers={**auth, "Content-Type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    unknown = httpx.get(f"{chat_server.frontend.url}/embeddings", headers=auth, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "GET /v1/embeddings: Not Found"


def test_missing_or_wrong_key_gets_401(chat_server):
    with pytest.raises(openai.AuthenticationError) as info:
        chat_server.openai(api_key="not-the-key").chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=2)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic " + API_KEY}):
        response = httpx.get(f"{chat_server.frontend.url}/models", headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["type"] == "invalid_request_error"
    ok = httpx.get(f"{chat_server.frontend.url}/models", headers={"x-api-key": API_KEY}, timeout=30)
    assert ok.status_code == 200 and ok.json()["object"] == "list"


def test_triton_api_is_passed_through_on_the_same_port_behind_the_same_key(chat_server, greedy):
    from loraship.client import Client

    root = chat_server.frontend.root
    assert httpx.get(f"{root}/v2/health/ready", timeout=30).status_code == 200  # probes need no key
    status, reply = chat_server.generate(MODEL, {"text_input": PROMPT, "max_tokens": MAX_TOKENS}, url=root)
    assert status == 200 and reply["text_output"] == greedy(PROMPT).text
    refused = httpx.post(f"{root}/v2/models/{MODEL}/generate", json={"text_input": PROMPT, "max_tokens": 2}, timeout=30)
    assert refused.status_code >= 400 and "restricted" in refused.json()["error"]
    bearer = httpx.post(f"{root}/v2/models/{MODEL}/generate", json={"text_input": PROMPT, "max_tokens": 2},
                        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert bearer.status_code == 200
    with Client(root, model=MODEL, api_key=API_KEY) as client:  # the loraship client's SSE stream through the proxy
        stream = client.stream(PROMPT, max_tokens=MAX_TOKENS)
        assert [c.text for c in stream] and stream.reply.text == greedy(PROMPT).text


def _counter(metrics: str, name: str) -> float:
    """A loraship counter of this model on Triton's /metrics (0 before its first increment)."""
    from loraship.client.metrics import model_counters

    return model_counters(metrics, MODEL)[name]


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_disconnects_mid_stream_stops_generation(chat_server, chat_ids, greedy, n):
    """The openai client closes its stream after three chunks of an 1800-token request (of n choices):
    the frontend closes its upstream streams, Triton cancels the requests and the model stops (its own
    counters say so: n more cancelled requests, and fewer tokens than asked for)."""
    before = chat_server.metrics()
    max_tokens = 1800
    stream = chat_server.openai().chat.completions.create(model=MODEL, messages=CONVERSATION[1:2], max_tokens=max_tokens,
                                                          stream=True, n=n)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 30
    after = chat_server.metrics()
    while _counter(after, "loraship_requests_cancelled") < _counter(before, "loraship_requests_cancelled") + n:
        assert time.monotonic() < deadline, "the abandoned request never ended"
        time.sleep(0.1)
        after = chat_server.metrics()
    assert _counter(after, "loraship_requests_cancelled") == _counter(before, "loraship_requests_cancelled") + n
    generated = _counter(after, "loraship_completion_tokens") - _counter(before, "loraship_completion_tokens")
    assert 2 <= generated < max_tokens, generated  # typically 20-80 tokens here; more on a busy machine
    reply = chat_server.openai().chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == greedy(chat_ids(CONVERSATION)).text  # the next request is served unchanged
    print(f"stopped after {generated:.0f} of {max_tokens} tokens")
