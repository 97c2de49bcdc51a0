"""`loraship.client.Client` and `loraship generate` against a real tritonserver (HTTP, SSE, gRPC)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loraship.client import EndpointError

PROMPTS = ("The quick brown fox", "Write a short poem about the sea.", "LoRA adds small low-rank matrices")
MAX_TOKENS = 12


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_generate_and_stream_equal_tritons_greedy_output(served, protocol):
    client = served.client(protocol)
    client.check()
    chunk_counts = []
    for prompt in PROMPTS:
        expected = served.raw_generate(prompt, max_tokens=MAX_TOKENS)
        done = client.generate(prompt, max_tokens=MAX_TOKENS)
        assert done.text == expected["text_output"]
        assert (done.prompt_tokens, done.completion_tokens, done.finish_reason) == (
            expected["prompt_tokens"], expected["completion_tokens"], expected["finish_reason"])
        assert done.prompt_tokens > 0 and 0 < done.completion_tokens <= MAX_TOKENS
        assert 0 < done.ttft_s == done.total_s  # one response for a non-streaming request

        stream = client.stream(prompt, max_tokens=MAX_TOKENS)
        chunks = list(stream)
        assert "".join(c.text for c in chunks) == expected["text_output"] == stream.completion.text
        # one chunk per token response; a busy server joins the tokens waiting for a stream into one response
        assert all(c.text for c in chunks) and 1 <= len(chunks) <= stream.completion.completion_tokens
        times = [c.t for c in chunks]
        assert times == sorted(times) and stream.completion.ttft_s == times[0] <= stream.completion.total_s
        assert stream.completion.completion_tokens == expected["completion_tokens"]
        assert stream.completion.prompt_tokens == expected["prompt_tokens"]
        chunk_counts.append(len(chunks))
    assert max(chunk_counts) > 1  # it streams: a client that buffered each reply into one chunk fails here


def test_stop_strings_and_threads_share_one_client(served):
    from concurrent.futures import ThreadPoolExecutor

    full = served.raw_generate(PROMPTS[0], max_tokens=MAX_TOKENS)["text_output"]
    stop = full.split()[2]
    for protocol in ("http", "grpc"):
        client = served.client(protocol)
        done = client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, stop=[stop])
        assert done.finish_reason == "stop" and stop not in done.text and full.startswith(done.text.rstrip())
        with ThreadPoolExecutor(4) as pool:  # each thread gets its own tritonclient connection
            texts = list(pool.map(lambda p: client.stream(p, max_tokens=MAX_TOKENS).collect().text, PROMPTS * 2))
        assert texts == [served.raw_generate(p, max_tokens=MAX_TOKENS)["text_output"] for p in PROMPTS * 2]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_missing_and_wrong_api_key_are_one_line_errors(served, protocol):
    with pytest.raises(EndpointError, match=r"requires an API key \(pass --api-key or set LORASHIP_API_KEY\)"):
        served.client(protocol, api_key=None).check()
    with pytest.raises(EndpointError, match="refused the API key"):
        served.client(protocol, api_key="not-the-key").stream("hi", max_tokens=2).collect()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_down_server_and_unknown_model(served, dead_url, protocol):
    from loraship.client import Client

    url = f"http://{dead_url}" if protocol == "http" else dead_url
    with pytest.raises(EndpointError, match=r"cannot reach Triton at .* \(start it with `loraship serve"):
        Client(url, protocol=protocol, model="x", timeout=5).check()
    with pytest.raises(EndpointError, match=rf"model 'nope' is not ready on .*\(served: {served.model}\)"):
        served.client(protocol, model="nope").check()
    assert served.client(protocol, model=None).model == served.model  # the only ready model


def _cli(*args: str, key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LORASHIP_API_KEY"}
    if key:
        env["LORASHIP_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "loraship.cli.main", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_chat_messages_are_rendered_by_the_server(served, protocol):
    client = served.client(protocol)
    assert client.chat_template  # the demo export carries a chat template
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    expected = served.raw_generate(chat, max_tokens=MAX_TOKENS)
    done = client.generate(chat, max_tokens=MAX_TOKENS)
    assert (done.text, done.prompt_tokens) == (expected["text_output"], expected["prompt_tokens"])
    assert client.stream(chat, max_tokens=MAX_TOKENS).collect().text == expected["text_output"]
    assert done.prompt_tokens > served.raw_generate(PROMPTS[1], max_tokens=1)["prompt_tokens"]  # the template's tokens count


def test_cli_generate_streams_the_greedy_reply(served):
    """By default the prompt is a user message in the model's template; --raw sends the text as is."""
    chat = served.raw_generate([{"role": "user", "content": PROMPTS[1]}], max_tokens=MAX_TOKENS)
    for url, protocol in ((served.server.http_url, "http"), (served.server.grpc_url, "grpc")):
        run = _cli("generate", "--url", url, "--protocol", protocol, "--max-tokens", str(MAX_TOKENS), PROMPTS[1], key=served.api_key)
        assert run.returncode == 0, run.stderr
        assert run.stdout == chat["text_output"] + "\n"
        assert f"{chat['prompt_tokens']} prompt + {chat['completion_tokens']} completion tokens, TTFT" in run.stderr
    raw = served.raw_generate(PROMPTS[1], max_tokens=MAX_TOKENS)
    run = _cli("generate", "--url", served.server.http_url, "--raw", "--max-tokens", str(MAX_TOKENS), PROMPTS[1], key=served.api_key)
    assert run.returncode == 0 and run.stdout == raw["text_output"] + "\n"
    system = served.raw_generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}], max_tokens=MAX_TOKENS)
    run = _cli("generate", "--url", served.server.http_url, "--system", "Be brief.", "--max-tokens", str(MAX_TOKENS), PROMPTS[1], key=served.api_key)
    assert run.returncode == 0 and run.stdout == system["text_output"] + "\n"
    run = _cli("generate", "--url", served.server.http_url, "--raw", "--system", "Be brief.", PROMPTS[1], key=served.api_key)
    assert run.returncode == 1 and "--system needs a model with a chat template" in run.stderr
    run = _cli("generate", "--url", served.server.http_url, "hi", key="wrong")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"Error: {served.server.http_url} refused the API key (check --api-key / LORASHIP_API_KEY)"]
