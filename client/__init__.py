"""Clients of a loraship Triton endpoint: the Python `Client`, the benchmark and the Gradio UI."""

from loraship.client.client import Chunk, Client, Reply, Stream
from loraship.client.errors import EndpointError
from loraship.client.sampling import SamplingOptions
from loraship.endpoint import API_KEY_HEADER

__all__ = ["API_KEY_HEADER", "Chunk", "Client", "EndpointError", "Reply", "SamplingOptions", "Stream"]
