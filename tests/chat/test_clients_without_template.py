"""loraship's clients against a model without a chat template: they fall back to raw text, and say so."""

from __future__ import annotations

import os
import subprocess
import sys

from loraship.client import Client
from loraship.client.ui import ERROR_PREFIX, respond

from .conftest import API_KEY, MAX_TOKENS, MODEL, RAW_MODEL

PROMPT = "Write a short poem about the sea."


def test_generate_sends_raw_text_to_a_model_without_template(chat_server, greedy):
    env = {**os.environ, "LORASHIP_API_KEY": API_KEY}
    run = subprocess.run([sys.executable, "-m", "loraship.cli.main", "generate", "--url", chat_server.triton.http_url, "--model", RAW_MODEL,
                          "--max-tokens", str(MAX_TOKENS), PROMPT], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == greedy(PROMPT).text + "\n"


def test_ui_turns_with_and_without_template(chat_server, chat_ids, greedy):
    """The UI's reply function: a chat model gets the conversation so far; a raw model each message alone."""
    with Client(chat_server.triton.grpc_url, protocol="grpc", model=RAW_MODEL, api_key=API_KEY) as raw, \
            Client(chat_server.triton.http_url, model=MODEL, api_key=API_KEY) as chat:
        assert not raw.chat_template and chat.chat_template
        *_, (history, box, conversation, stats) = respond(raw, PROMPT, [], [], "ignored without a template", MAX_TOKENS, 0.0, 1.0)
        assert conversation == [] and box == ""
        assert history[-1]["content"] == greedy(PROMPT).text and stats.startswith("reply 1: TTFT")  # stats beside the reply, not in it

        *_, (history, _, conversation, _) = respond(chat, "Hello", [], [], None, MAX_TOKENS, 0.0, 1.0)  # None: accordion never opened
        first = greedy(chat_ids([{"role": "user", "content": "Hello"}])).text
        assert conversation == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first}]
        *_, (history, _, conversation, stats) = respond(chat, PROMPT, history, conversation, "Be brief.", MAX_TOKENS, 0.0, 1.0)
        sent = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": first}, {"role": "user", "content": PROMPT}]
        assert conversation[-1] == {"role": "assistant", "content": greedy(chat_ids(sent)).text} and len(history) == 4
        assert history == conversation and stats.startswith("reply 2: TTFT")

    with Client(chat_server.triton.http_url, model=MODEL, api_key="wrong-key") as refused:
        *_, (history, _, kept, stats) = respond(refused, PROMPT, history, conversation, "", MAX_TOKENS, 0.0, 1.0)
    assert history[-1]["content"].startswith(ERROR_PREFIX) and kept == conversation  # a failed turn is not remembered
    assert stats == "reply 3: failed"

