"""Clients of a loraship Triton endpoint: the Python `Client`, the benchmark and the Gradio UI."""

from loraship.client.client import API_KEY_HEADER, Chunk, Client, Completion, EndpointError, Stream

__all__ = ["API_KEY_HEADER", "Chunk", "Client", "Completion", "EndpointError", "Stream"]
