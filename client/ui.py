"""`loraship ui`: a thin Gradio chat over `Client` for trying a fine-tune by hand.

The conversation so far goes to the server as chat messages, which the model renders with its own
chat template (a model without one gets each message as raw text), and the reply streams in,
followed by its TTFT and tokens/s.
Endpoint problems (down, unready, wrong key) show as one-line messages in the chat.
Nothing here talks to the internet: analytics off, no share link, system fonts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from loraship.client.client import Client, EndpointError

STATS_PREFIX = "TTFT"
ERROR_PREFIX = "Endpoint error:"


def stats_line(ttft_s: float, tokens_per_s: float, completion_tokens: int) -> str:
    """The line shown under each reply."""
    return f"{STATS_PREFIX} {ttft_s * 1000:.0f} ms · {tokens_per_s:.1f} tokens/s · {completion_tokens} tokens"


def _endpoint_status(client: Client) -> str:
    try:
        client.check()
    except EndpointError as exc:
        return f"{ERROR_PREFIX} {exc}"
    mode = "multi-turn chat with its template" if client.chat_template else "no chat template: each message is sent as raw text"
    return f"Ready: `{client.model}` at {client.url} ({client.protocol}); {mode}"


Messages = list[dict[str, Any]]


def respond(client: Client, message: str, history: Messages, conversation: Messages, system: str, max_tokens: int,
            temperature: float, top_p: float) -> Iterator[tuple[Messages, str, Messages]]:
    """Stream one reply into the shown history; yields (history, cleared textbox, conversation).

    ``conversation`` is what the model has seen: the user and assistant turns without stats or errors.
    A failed turn is shown but left out of it, so the next message does not carry it.
    """
    if not message.strip():
        yield history, message, conversation
        return
    history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    yield history, "", conversation
    text = ""
    try:
        turns: Messages | None = None
        prompt: Any = message
        if client.chat_template:
            turns = [*conversation, {"role": "user", "content": message}]
            prompt = ([{"role": "system", "content": system}] if system.strip() else []) + turns
        stream = client.stream(prompt, max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
        for chunk in stream:
            text += chunk.text
            history[-1] = {"role": "assistant", "content": text}
            yield history, "", conversation
        done = stream.completion
        history[-1] = {"role": "assistant", "content": f"{text}\n\n{stats_line(done.ttft_s, done.tokens_per_s, done.completion_tokens)}"}
        if turns is not None:
            conversation = [*turns, {"role": "assistant", "content": done.text}]
    except EndpointError as exc:
        history[-1] = {"role": "assistant", "content": f"{text}\n\n{ERROR_PREFIX} {exc}".lstrip()}
    yield history, "", conversation


def build_app(client: Client) -> Any:
    """The Gradio Blocks app (not launched)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    with gr.Blocks(title="loraship", analytics_enabled=False) as app:
        gr.Markdown("### loraship: try the endpoint")
        status = gr.Markdown(elem_id="endpoint-status")
        system = gr.Textbox(elem_id="system", label="system prompt (chat template only)", lines=1, max_lines=4)
        chat = gr.Chatbot(elem_id="chat", show_label=False, height=420, render_markdown=False, buttons=["copy"], feedback_options=None)
        conversation = gr.State([])
        with gr.Row():
            prompt = gr.Textbox(elem_id="prompt", placeholder="Type a message and press Enter or Send", show_label=False, scale=5, autofocus=True)
            send = gr.Button("Send", elem_id="send", variant="primary", scale=1)
            clear = gr.Button("New chat", elem_id="clear", scale=1)
        with gr.Row():
            max_tokens = gr.Slider(1, 1024, value=64, step=1, label="max tokens", elem_id="max-tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)", elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p", elem_id="top-p")

        def reply(message: str, history: Messages, turns: Messages, sys_prompt: str, n: int, t: float, p: float) -> Iterator[tuple[Messages, str, Messages]]:
            yield from respond(client, message, history, turns, sys_prompt, n, t, p)

        inputs = [prompt, chat, conversation, system, max_tokens, temperature, top_p]
        send.click(reply, inputs, [chat, prompt, conversation])
        prompt.submit(reply, inputs, [chat, prompt, conversation])
        clear.click(lambda: ([], [], ""), None, [chat, conversation, prompt])
        app.load(lambda: _endpoint_status(client), None, status)
    return app


def launch(client: Client, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve the app on ``host:port`` (no share link, no analytics); returns the app."""
    import gradio as gr

    app = build_app(client)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=8).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, prevent_thread_lock=not block,
        theme=theme, footer_links=[], quiet=not block, mcp_server=False,
    )
    return app
