"""`loraship ui` in real headless Chromium (Debian's /usr/bin/chromium via Playwright) against a real tritonserver."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from playwright.sync_api import Error as PlaywrightError

from loraship.client import Client
from loraship.client.ui import launch
from loraship.triton_repo.localhost import free_port

PROMPT = "Write a short poem about the sea."
MAX_TOKENS = 24  # the UI slider's value below
VIEWPORT = {"width": 1280, "height": 800}  # a laptop screen


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


def _open(browser_context, url: str):
    page = browser_context.new_page()
    page.set_viewport_size(VIEWPORT)
    page.goto(url)
    return page


def _box(page, selector: str) -> dict:
    box = page.locator(selector).first.bounding_box()
    assert box, f"{selector} is not shown"
    return {**box, "bottom": box["y"] + box["height"]}


def _set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_chat_streams_the_greedy_reply_with_ttft(served, ui_for, browser_context, tmp_path):
    """The reply bubble holds exactly the model's reply; TTFT and tokens/s sit on a quieter line under the
    chat; the first text box on the page is the question, and the system prompt is folded away below."""
    expected = served.raw_generate([{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS)
    page = _open(browser_context, ui_for(served.client("grpc")))
    page.locator("#endpoint-status").get_by_text(f"Ready: {served.model}").wait_for(timeout=30_000)
    assert "multi-turn chat with its template" in page.locator("#endpoint-status").inner_text()
    assert [t.evaluate("e => e.closest('[id]').id") for t in page.locator("textarea:visible").all()] == ["prompt"]
    assert page.locator("#system textarea").is_hidden()  # folded in its accordion, below the chat
    assert _box(page, "#system-prompt")["y"] > _box(page, "#chat")["bottom"]
    _set_slider(page, "max-tokens", MAX_TOKENS)
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#send").click()
    page.locator("#stats").get_by_text("reply 1: TTFT").wait_for(timeout=60_000)
    page.screenshot(path=str(tmp_path / "ui-reply.png"), full_page=True)

    bot = page.locator("#chat .message.bot").last
    assert " ".join(bot.inner_text().split()) == " ".join(expected["text_output"].split())  # the reply, nothing else
    assert page.locator("#chat #stats").count() == 0 and _box(page, "#stats")["y"] >= _box(page, "#chat")["bottom"]
    match = re.fullmatch(r"reply 1: TTFT (\d+) ms · ([\d.]+) tokens/s · (\d+) tokens", page.locator("#stats").inner_text().strip())
    assert match, page.locator("#stats").inner_text()
    assert int(match[3]) == expected["completion_tokens"] and float(match[2]) > 0
    stats_style = page.locator("#stats p").evaluate("e => [getComputedStyle(e).fontSize, getComputedStyle(e).color]")
    reply_style = page.locator("#chat .message.bot .message-content").last.evaluate("e => [getComputedStyle(e).fontSize, getComputedStyle(e).color]")
    assert float(stats_style[0].removesuffix("px")) < float(reply_style[0].removesuffix("px")) and stats_style[1] != reply_style[1]  # quieter
    assert page.locator("#chat .message.user").last.inner_text().strip() == PROMPT
    assert page.locator("#prompt textarea").input_value() == ""


def _send(page, text: str, turn: int) -> str:
    """Type a message, wait for reply number ``turn`` (1-based) to finish (its stats line); its text."""
    page.locator("#prompt textarea").fill(text)
    page.locator("#prompt textarea").press("Enter")
    page.locator("#stats").get_by_text(f"reply {turn}: TTFT").wait_for(timeout=60_000)
    return page.locator("#chat .message.bot").nth(turn - 1).inner_text()


def test_multi_turn_chat_sends_the_history_and_system_prompt_and_new_chat_forgets_it(served, ui_for, browser_context, tmp_path):
    """Each turn's reply is the server's greedy reply to the whole conversation so far, with the system
    prompt (unfolded from its accordion) first; after three turns the first question is still in view,
    clear of the chat's corner buttons; "New chat" starts again from an empty history."""
    system, questions = "You answer in one sentence.", ["What is the capital of France?", PROMPT, "And one about ships?"]
    page = _open(browser_context, ui_for(served.client("http")))
    page.locator("#endpoint-status").get_by_text(f"Ready: {served.model}").wait_for(timeout=30_000)
    _set_slider(page, "max-tokens", MAX_TOKENS)
    page.locator("#system-prompt").get_by_text("System prompt").click()
    page.locator("#system textarea").fill(system)

    turns = [{"role": "system", "content": system}]
    for turn, question in enumerate(questions, 1):
        turns.append({"role": "user", "content": question})
        reply = served.raw_generate(turns, max_tokens=MAX_TOKENS)["text_output"]
        assert " ".join(_send(page, question, turn).split()) == " ".join(reply.split())
        turns.append({"role": "assistant", "content": reply})
    alone = served.raw_generate([{"role": "system", "content": system}, {"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS)["text_output"]
    assert turns[4]["content"] != alone  # the history changes the reply, so the checks above mean something
    page.screenshot(path=str(tmp_path / "ui-multi-turn.png"), full_page=True)

    first, view, corner = _box(page, "#chat .message.user"), _box(page, "#chat .bubble-wrap"), _box(page, "#chat .top-panel")
    assert page.locator("#chat .message.user").first.inner_text().strip() == questions[0]
    assert view["y"] <= first["y"] and first["bottom"] <= view["bottom"], (first, view)  # not scrolled away
    assert first["y"] >= corner["bottom"], (first, corner)  # not under the trash and copy icons

    page.locator("#clear").click()
    page.locator("#chat .message.bot").first.wait_for(state="detached", timeout=30_000)
    assert page.locator("#stats").inner_text().strip() == ""
    assert " ".join(_send(page, PROMPT, 1).split()) == " ".join(alone.split())


def test_unreachable_endpoint_and_wrong_key_are_shown(served, ui_for, browser_context, dead_url, tmp_path):
    page = _open(browser_context, ui_for(Client(f"http://{dead_url}", model="x", timeout=5)))
    status = page.locator("#endpoint-status")
    status.get_by_text("Endpoint error: cannot reach Triton").wait_for(timeout=30_000)
    page.locator("#prompt textarea").fill("hello")
    page.locator("#prompt textarea").press("Enter")
    page.locator("#chat .message.bot").last.get_by_text("Endpoint error: cannot reach Triton").wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "ui-unreachable.png"), full_page=True)

    page.goto(ui_for(served.client("http", api_key="wrong-key")))
    page.locator("#endpoint-status").get_by_text("refused the API key").wait_for(timeout=30_000)


def test_ui_command_prints_one_line_and_nothing_per_message(served, browser_context):
    """`loraship ui` as a user runs it: its own one-line banner on stderr, then nothing for each message: no
    Gradio share-link hint, no Starlette deprecation warning (Gradio's routes raise one per message)."""
    port = free_port()
    env = {**os.environ, "LORASHIP_API_KEY": served.api_key}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "loraship.cli.main", "ui", "--url", served.server.grpc_url, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        page = browser_context.new_page()
        deadline = time.monotonic() + 60
        while True:
            try:
                page.goto(f"http://127.0.0.1:{port}/")
                break
            except PlaywrightError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.5)
        page.locator("#endpoint-status").get_by_text(f"Ready: {served.model}").wait_for(timeout=30_000)
        _set_slider(page, "max-tokens", 4)
        for turn in (1, 2):
            _send(page, "Hello", turn)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert err.splitlines() == [f"loraship ui on http://127.0.0.1:{port} for {served.server.grpc_url} (grpc); Ctrl-C to stop."]
    assert out.strip() in ("", "Keyboard interruption in main thread... closing server.")  # Gradio's goodbye on Ctrl-C
