"""`loraship ui`: a Gradio chat for trying an endpoint by hand."""

from __future__ import annotations

import click

from loraship.cli.generate import endpoint_options, make_client


@click.command(epilog="""\b
Example:
  loraship serve --repo work/repo --http-port 8000 &
  loraship ui --url http://127.0.0.1:8000 --port 7860
  # then open http://127.0.0.1:7860
""")
@endpoint_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the UI binds (loopback unless you say otherwise).")
@click.option("--port", default=7860, show_default=True, help="Port the UI listens on.")
def ui(url: str | None, protocol: str | None, model: str | None, api_key: str | None, timeout: float, host: str, port: int) -> None:
    """Chat with the endpoint: multi-turn in the model's chat template, streamed replies with their TTFT and tokens/s."""
    from loraship.client.ui import launch

    client = make_client(url, protocol, model, api_key, timeout)
    click.echo(f"loraship ui on http://{host}:{port} for {client.url} ({client.protocol}); Ctrl-C to stop.", err=True)
    launch(client, host=host, port=port)
