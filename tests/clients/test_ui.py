"""`loraship ui` in real headless Chromium (Debian's /usr/bin/chromium via Playwright) against a real tritonserver."""

from __future__ import annotations

import re

import pytest

from loraship.client import Client
from loraship.client.ui import launch
from loraship.triton_repo.server import free_port

PROMPT = "Write a short poem about the sea."
MAX_TOKENS = 24  # the UI slider's value below


@pytest.fixture
def ui_for(request):
    """Launch the Gradio app for a client on a free loopback port; closed after the test."""
    started = []

    def start(client: Client) -> str:
        port = free_port()
        started.append((launch(client, port=port, block=False), client))
        return f"http://127.0.0.1:{port}/"

    yield start
    for app, client in started:
        app.close()
        client.close()


def _set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_chat_streams_the_greedy_reply_with_ttft(served, ui_for, browser_context, tmp_path):
    expected = served.raw_generate([{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS)
    page = browser_context.new_page()
    page.goto(ui_for(served.client("grpc")))
    page.locator("#endpoint-status").get_by_text(f"Ready: {served.model}").wait_for(timeout=30_000)
    assert "multi-turn chat with its template" in page.locator("#endpoint-status").inner_text()
    _set_slider(page, "max-tokens", MAX_TOKENS)
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#send").click()
    bot = page.locator("#chat .message.bot").last
    bot.get_by_text("TTFT").wait_for(timeout=60_000)
    page.screenshot(path=str(tmp_path / "ui-reply.png"), full_page=True)

    shown = bot.inner_text()
    reply, stats = shown.rsplit("TTFT", 1)
    assert " ".join(reply.split()) == " ".join(expected["text_output"].split())
    match = re.fullmatch(r" (\d+) ms · ([\d.]+) tokens/s · (\d+) tokens", stats.strip("\n").splitlines()[0])
    assert match, stats
    assert int(match[3]) == expected["completion_tokens"] and float(match[2]) > 0
    assert page.locator("#chat .message.user").last.inner_text().strip() == PROMPT
    assert page.locator("#prompt textarea").input_value() == ""


def _send(page, text: str, turn: int) -> str:
    """Type a message, wait for reply number ``turn`` (1-based) to finish; its text without the stats line."""
    page.locator("#prompt textarea").fill(text)
    page.locator("#prompt textarea").press("Enter")
    bot = page.locator("#chat .message.bot").nth(turn - 1)
    bot.get_by_text("TTFT").wait_for(timeout=60_000)
    return bot.inner_text().rsplit("TTFT", 1)[0]


def test_multi_turn_chat_sends_the_history_and_system_prompt_and_new_chat_forgets_it(served, ui_for, browser_context, tmp_path):
    """Each turn's reply is the server's greedy reply to the whole conversation so far (stats lines left
    out), with the system prompt first; "New chat" starts again from an empty history."""
    system, first, second = "You answer in one sentence.", "What is the capital of France?", PROMPT
    page = browser_context.new_page()
    page.goto(ui_for(served.client("http")))
    page.locator("#endpoint-status").get_by_text(f"Ready: {served.model}").wait_for(timeout=30_000)
    _set_slider(page, "max-tokens", MAX_TOKENS)
    page.locator("#system textarea").fill(system)

    turns = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    reply1 = served.raw_generate(turns, max_tokens=MAX_TOKENS)["text_output"]
    assert " ".join(_send(page, first, 1).split()) == " ".join(reply1.split())
    turns += [{"role": "assistant", "content": reply1}, {"role": "user", "content": second}]
    reply2 = served.raw_generate(turns, max_tokens=MAX_TOKENS)["text_output"]
    alone = served.raw_generate([{"role": "system", "content": system}, {"role": "user", "content": second}], max_tokens=MAX_TOKENS)["text_output"]
    assert reply2 != alone  # the history changes the reply, so the check below means something
    assert " ".join(_send(page, second, 2).split()) == " ".join(reply2.split())
    page.screenshot(path=str(tmp_path / "ui-multi-turn.png"), full_page=True)

    page.locator("#clear").click()
    page.locator("#chat .message.bot").first.wait_for(state="detached", timeout=30_000)
    assert " ".join(_send(page, second, 1).split()) == " ".join(alone.split())


def test_unreachable_endpoint_and_wrong_key_are_shown(served, ui_for, browser_context, dead_url, tmp_path):
    page = browser_context.new_page()
    page.goto(ui_for(Client(f"http://{dead_url}", model="x", timeout=5)))
    status = page.locator("#endpoint-status")
    status.get_by_text("Endpoint error: cannot reach Triton").wait_for(timeout=30_000)
    page.locator("#prompt textarea").fill("hello")
    page.locator("#prompt textarea").press("Enter")
    page.locator("#chat .message.bot").last.get_by_text("Endpoint error: cannot reach Triton").wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "ui-unreachable.png"), full_page=True)

    page.goto(ui_for(served.client("http", api_key="wrong-key")))
    page.locator("#endpoint-status").get_by_text("refused the API key").wait_for(timeout=30_000)
