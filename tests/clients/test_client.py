"""`loraship.client.Client` and `loraship generate` against a real tritonserver (HTTP, SSE, gRPC)."""

from __future__ import annotations

import json
import os
import re
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
        assert "".join(c.text for c in chunks) == expected["text_output"] == stream.reply.text
        # one chunk per token response; a busy server joins the tokens waiting for a stream into one response
        assert all(c.text for c in chunks) and 1 <= len(chunks) <= stream.reply.completion_tokens
        times = [c.t for c in chunks]
        assert times == sorted(times) and stream.reply.ttft_s == times[0] <= stream.reply.total_s
        assert stream.reply.completion_tokens == expected["completion_tokens"]
        assert stream.reply.prompt_tokens == expected["prompt_tokens"]
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


@pytest.mark.parametrize("url, protocol, expected", [
    ("127.0.0.1:8001", None, ("grpc", False, "127.0.0.1:8001")),  # no scheme: gRPC, as --help says
    ("localhost", None, ("grpc", False, "localhost:8001")),
    ("grpc://example.org:9001", None, ("grpc", False, "example.org:9001")),
    ("grpcs://example.org", None, ("grpc", True, "example.org:443")),
    ("grpc://example.org:9001", "grpc", ("grpc", False, "example.org:9001")),
    ("http://127.0.0.1:8000/", None, ("http", False, "http://127.0.0.1:8000")),
    ("HTTPS://example.org/triton", None, ("http", True, "https://example.org:443/triton")),
    ("example.org:8000", "http", ("http", False, "http://example.org:8000")),  # --protocol picks for a URL without a scheme
    (None, None, ("http", False, "http://127.0.0.1:8000")),
    (None, "grpc", ("grpc", False, "127.0.0.1:8001")),
])
def test_the_url_picks_the_protocol(url, protocol, expected):
    from loraship.client.url import parse_endpoint

    endpoint = parse_endpoint(url, protocol)
    assert (endpoint.protocol, endpoint.ssl, endpoint.url) == expected


@pytest.mark.parametrize("url, protocol, message", [
    ("http://127.0.0.1:8000", "grpc", "http://127.0.0.1:8000 is an HTTP URL but the protocol is grpc (drop --protocol: the URL's scheme picks it)"),
    ("grpcs://example.org", "http", "grpcs://example.org is a gRPC URL but the protocol is http (drop --protocol: the URL's scheme picks it)"),
    ("ftp://example.org:21", None, "unknown URL scheme 'ftp://' in 'ftp://example.org:21' (use http:// or https:// for HTTP; grpc://, grpcs:// or a bare HOST:PORT for gRPC)"),
    ("127.0.0.1:99999", None, "cannot parse endpoint URL '127.0.0.1:99999' (use e.g. http://127.0.0.1:8000 for HTTP or 127.0.0.1:8001 for gRPC)"),
    ("http://:8000", None, "cannot parse endpoint URL 'http://:8000' (use e.g. http://127.0.0.1:8000 for HTTP or 127.0.0.1:8001 for gRPC)"),
    ("127.0.0.1:8001", "tcp", "unknown protocol 'tcp' (use http or grpc)"),
])
def test_urls_the_rule_refuses(url, protocol, message):
    from loraship.client import Client

    with pytest.raises(EndpointError) as refused:
        Client(url, protocol=protocol)
    assert str(refused.value) == message


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    """``loraship ARGS`` in this process through the CLI's error boundary: (exit code, stdout, stderr)."""
    from loraship.cli.main import main

    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_wrong_url_port_or_protocol_is_one_line_in_every_client_command(served, dead_url, silent_url, command, capsys, monkeypatch, tmp_path):
    """Each wrong endpoint, against the real tritonserver (its HTTP and gRPC ports swapped), a loopback
    port nothing listens on, a name that never resolves, and a TCP listener that never answers:
    exit 1 and exactly one line on stderr, without --debug."""
    http_url, grpc_url = served.server.http_url, served.server.grpc_url
    http_bare = http_url.removeprefix("http://")
    args = ["hi"] if command == "generate" else ["--out", str(tmp_path / "bench"), "--requests", "1"]
    monkeypatch.setenv("LORASHIP_API_KEY", served.api_key)
    cases = [
        (["--url", "http://nosuch.invalid:8000"], "cannot resolve host 'nosuch.invalid' of http://nosuch.invalid:8000 (check --url's host name)"),
        (["--url", "nosuch.invalid:8001"], "cannot resolve host 'nosuch.invalid' of nosuch.invalid:8001 (check --url's host name)"),
        (["--url", f"http://{dead_url}"], f"cannot reach Triton at http://{dead_url} (http) (start it with `loraship serve --repo REPO`, or check --url)"),
        (["--url", dead_url], f"cannot reach Triton at {dead_url} (grpc) (start it with `loraship serve --repo REPO`, or check --url)"),
        (["--url", f"http://{grpc_url}"], f"http://{grpc_url} does not answer HTTP: is it a gRPC port? "
                                          f"(for gRPC pass --url {grpc_url} without a scheme; Triton's HTTP port is 8000 by default)"),
        (["--url", http_bare], f"{http_bare} does not answer gRPC: is it an HTTP port? "
                               f"(for HTTP pass --url {http_url}; Triton's gRPC port is 8001 by default)"),
        (["--url", silent_url, "--timeout", "2"], f"no gRPC answer from {silent_url} within 2 s (check that --url is Triton's gRPC port, or raise --timeout)"),
        (["--url", f"http://{silent_url}", "--timeout", "2"],
         f"no HTTP answer from http://{silent_url} within 2 s (check that --url is Triton's HTTP port, or raise --timeout)"),
        (["--url", grpc_url, "--api-key", "not-the-key"], f"{grpc_url} refused the API key (check --api-key / LORASHIP_API_KEY)"),
        (["--url", http_url, "--api-key", "not-the-key"], f"{http_url} refused the API key (check --api-key / LORASHIP_API_KEY)"),
        (["--url", "ftp://example.org"], "unknown URL scheme 'ftp://' in 'ftp://example.org' (use http:// or https:// for HTTP; grpc://, grpcs:// or a bare HOST:PORT for gRPC)"),
    ]
    for extra, message in cases:
        code, out, err = _main([command, *extra, *args], capsys)
        assert (code, err.splitlines()) == (1, [f"Error: {message}"]), extra
    for url in (http_url, grpc_url):
        code, _, err = _main([command, "--url", url, "--model", "nope", *args], capsys)
        assert code == 1 and re.fullmatch(rf"Error: model 'nope' is not (served by|ready on) {re.escape(url)} \(served: {served.model}\) "
                                          r"\(pass --model with a served model name\)\n", err), err


def test_a_url_without_scheme_is_grpc_in_generate_and_bench(served, tmp_path):
    """The issue's crash: `--url HOST:PORT` without --protocol sent HTTP to the gRPC port (HTTPParseError traceback)."""
    chat = served.raw_generate([{"role": "user", "content": PROMPTS[1]}], max_tokens=MAX_TOKENS)
    run = _cli("generate", "--url", served.server.grpc_url, "--max-tokens", str(MAX_TOKENS), PROMPTS[1], key=served.api_key)
    assert (run.returncode, run.stdout) == (0, chat["text_output"] + "\n"), run.stderr
    out = tmp_path / "bench"
    run = _cli("bench", "--url", served.server.grpc_url, "--concurrency", "1", "--requests", "2", "--max-tokens", "2",
               "--prompt-tokens", "4", "--warmup", "0", "--out", str(out), key=served.api_key)
    assert run.returncode == 0, run.stderr
    config = json.loads((out / "bench.json").read_text())["config"]
    assert (config["protocol"], config["url"]) == ("grpc", served.server.grpc_url)
    run = _cli("generate", "--url", f"http://{served.server.grpc_url}", "hi", key=served.api_key)  # no --debug: no traceback
    assert run.returncode == 1 and run.stderr.splitlines() == [
        f"Error: http://{served.server.grpc_url} does not answer HTTP: is it a gRPC port? "
        f"(for gRPC pass --url {served.server.grpc_url} without a scheme; Triton's HTTP port is 8000 by default)"]
