"""`loraship ui`: a thin Gradio chat over `Client` for trying a fine-tune by hand.

The conversation so far goes to the server as chat messages, which the model renders with its own
chat template (a model without one gets each message as raw text), and the reply streams in. Its
TTFT and tokens/s go to a quiet line under the chat, not into the reply. The question box comes
first; the system prompt is folded away below it.
Endpoint problems (down, unready, wrong key) show as one-line messages in the chat.
Nothing here talks to the internet, nor writes to the terminal: analytics off, no share link, system fonts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from loraship.client.client import Client
from loraship.client.errors import EndpointError

STATS_PREFIX = "TTFT"
ERROR_PREFIX = "Endpoint error:"


def stats_line(turn: int, ttft_s: float, tokens_per_s: float, completion_tokens: int) -> str:
    """The line under the chat for reply number ``turn``."""
    return f"reply {turn}: {STATS_PREFIX} {ttft_s * 1000:.0f} ms · {tokens_per_s:.1f} tokens/s · {completion_tokens} tokens"


def _endpoint_status(client: Client) -> str:
    try:
        client.check()
    except EndpointError as exc:
        return f"{ERROR_PREFIX} {exc}"
    mode = "multi-turn chat with its template" if client.chat_template else "no chat template: each message is sent as raw text"
    return f"Ready: `{client.model}` at {client.url} ({client.protocol}); {mode}"


Messages = list[dict[str, Any]]


def respond(client: Client, message: str, history: Messages, conversation: Messages, system: str | None, max_tokens: int,
            temperature: float, top_p: float) -> Iterator[tuple[Messages, str, Messages, str]]:
    """Stream one reply into the shown history; yields (history, cleared textbox, conversation, stats line).
    ``system`` is None while its folded accordion has never been opened.

    ``conversation`` is what the model has seen: the user and assistant turns without errors.
    A failed turn is shown but left out of it, so the next message does not carry it.
    """
    if not message.strip():
        yield history, message, conversation, ""
        return
    history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    turn = sum(m["role"] == "assistant" for m in history)
    yield history, "", conversation, f"reply {turn}: waiting for the first token…"
    text = ""
    try:
        turns: Messages | None = None
        prompt: Any = message
        if client.chat_template:
            turns = [*conversation, {"role": "user", "content": message}]
            prompt = ([{"role": "system", "content": system}] if system and system.strip() else []) + turns
        stream = client.stream(prompt, max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
        for chunk in stream:
            text += chunk.text
            history[-1] = {"role": "assistant", "content": text}
            yield history, "", conversation, f"reply {turn}: streaming…"
        done = stream.reply
        stats = stats_line(turn, done.ttft_s, done.tokens_per_s, done.completion_tokens)
        if turns is not None:
            conversation = [*turns, {"role": "assistant", "content": done.text}]
    except EndpointError as exc:
        history[-1] = {"role": "assistant", "content": f"{text}\n\n{ERROR_PREFIX} {exc}".lstrip()}
        stats = f"reply {turn}: failed"
    yield history, "", conversation, stats


#: The stats line under the chat: smaller and greyer than the replies, so it does not read as the model's words.
CSS = """
#stats { min-height: 1.4em; }
#stats p { font-size: var(--text-sm); color: var(--body-text-color-subdued); margin: 0; }
"""


def build_app(client: Client) -> Any:
    """The Gradio Blocks app (not launched): the chat, its stats line, the question box and Send first;
    sampling sliders below; the system prompt folded away in an accordion at the bottom."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    with gr.Blocks(title="loraship", analytics_enabled=False) as app:
        status = gr.Markdown(elem_id="endpoint-status")
        chat = gr.Chatbot(elem_id="chat", show_label=False, height="calc(100vh - 330px)", min_height=380, render_markdown=False,
                          buttons=["copy_all"], feedback_options=None, placeholder="Replies stream here; each message carries the conversation so far.")
        stats = gr.Markdown(elem_id="stats")
        conversation = gr.State([])
        with gr.Row():
            prompt = gr.Textbox(elem_id="prompt", placeholder="Type a message and press Enter or Send", show_label=False, scale=5, autofocus=True)
            send = gr.Button("Send", elem_id="send", variant="primary", scale=1)
            clear = gr.Button("New chat", elem_id="clear", scale=1)
        with gr.Row():
            max_tokens = gr.Slider(1, 1024, value=64, step=1, label="max tokens", elem_id="max-tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)", elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p", elem_id="top-p")
        with gr.Accordion("System prompt", open=False, elem_id="system-prompt"):
            system = gr.Textbox(elem_id="system", label="sent first in each chat (models with a chat template only)", lines=1, max_lines=4)

        def reply(message: str, history: Messages, turns: Messages, sys_prompt: str | None, n: int, t: float, p: float) -> Iterator[tuple[Messages, str, Messages, str]]:
            yield from respond(client, message, history, turns, sys_prompt, n, t, p)

        inputs = [prompt, chat, conversation, system, max_tokens, temperature, top_p]
        outputs = [chat, prompt, conversation, stats]
        send.click(reply, inputs, outputs)
        prompt.submit(reply, inputs, outputs)
        clear.click(lambda: ([], [], "", ""), None, [chat, conversation, prompt, stats])
        app.load(lambda: f"**loraship** · {_endpoint_status(client)}", None, status)
    return app


def launch(client: Client, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve the app on ``host:port`` (no share link, no analytics, nothing printed); returns the app."""
    import gradio as gr

    _quiet_warnings()
    app = build_app(client)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=8).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, prevent_thread_lock=not block,
        theme=theme, css=CSS, footer_links=[], quiet=True, mcp_server=False,
    )
    return app


def _quiet_warnings() -> None:
    """Silence the deprecation warnings Gradio's own routes raise on every message (Starlette's renamed
    status constants): they concern Gradio's code, not the user's, and would flood the terminal."""
    import warnings

    try:
        from starlette.exceptions import StarletteDeprecationWarning
    except ImportError:  # older Starlette: it raises none
        return
    warnings.filterwarnings("ignore", category=StarletteDeprecationWarning)
