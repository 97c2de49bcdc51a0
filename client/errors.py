"""The client's one error type, and how connection, protocol and server errors become one line each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraship.errors import LorashipError

if TYPE_CHECKING:
    from loraship.client.client import Client


class EndpointError(LorashipError):
    """The endpoint is down, not ready, lacks the model, refused the key, or failed a request."""


class ServerError(Exception):
    """A transport's report that the server answered a request with an error (``message``, HTTP ``status``);
    `ErrorMapper` turns it into the `EndpointError` that names the cause."""

    def __init__(self, message: str, status: Any) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def refused(c: Client, message: str, status: Any) -> EndpointError:
    """The EndpointError for a server-side error message: a missing or wrong key, an unknown model, or else
    the message's first line."""
    first = message.strip().splitlines()[0] if message.strip() else f"status {status}"
    if "restricted" in first:
        if not c.api_key:
            return EndpointError(f"{c.url} requires an API key", "pass --api-key or set LORASHIP_API_KEY")
        return EndpointError(f"{c.url} refused the API key", "check --api-key / LORASHIP_API_KEY")
    if "unknown model" in first or ("not found" in first and "model" in first):
        return EndpointError(f"model {c.model!r} is not served by {c.url}{c.served_hint()}", "pass --model with a served model name")
    return EndpointError(f"request to {c.url} failed: {first}", "check the request parameters and the server's log")


def unreachable(c: Client) -> EndpointError:
    """Nothing listens at the client's port (or the host refuses)."""
    return EndpointError(f"cannot reach Triton at {c.url} ({c.protocol})", "start it with `loraship serve --repo REPO`, or check --url")


def unresolved(c: Client) -> EndpointError:
    """The client's host name does not resolve."""
    return EndpointError(f"cannot resolve host {c.host!r} of {c.url}", "check --url's host name")


def wrong_protocol(c: Client) -> EndpointError:
    """Something listens at the client's port but does not speak its protocol."""
    if c.protocol == "http":
        return EndpointError(f"{c.url} does not answer HTTP: is it a gRPC port?",
                             f"for gRPC pass --url {c.host}:{c.port} without a scheme; Triton's HTTP port is 8000 by default")
    return EndpointError(f"{c.url} does not answer gRPC: is it an HTTP port?",
                         f"for HTTP pass --url http://{c.host}:{c.port}; Triton's gRPC port is 8001 by default")


def silent(c: Client) -> EndpointError:
    """The connection opened but no answer came in time."""
    name = "HTTP" if c.protocol == "http" else "gRPC"
    return EndpointError(f"no {name} answer from {c.url} within {c.timeout:g} s",
                         f"check that --url is Triton's {name} port, or raise --timeout")


class ErrorMapper:
    """A context that turns connection, protocol, server and tritonclient errors into one-line `EndpointError`s."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (EndpointError, GeneratorExit)):
            return False
        import http.client
        import socket

        from tritonclient.utils import InferenceServerException

        c = self.client
        if isinstance(exc, ServerError):
            raise refused(c, exc.message, exc.status) from None
        if isinstance(exc, InferenceServerException):
            status, message = str(exc.status() or ""), exc.message() or str(exc)
            if "restricted" in message:
                raise refused(c, message, status) from None
            if "resolv" in message or "lookup" in message:
                raise unresolved(c) from None
            connect_failed = "failed to connect" in message
            if connect_failed and ("Socket closed" in message or "Failed parsing HTTP/2" in message) or "http2 header with status" in message:
                raise wrong_protocol(c) from None  # the port answered, but not in gRPC's HTTP/2
            if connect_failed or "Connection refused" in message:
                raise unreachable(c) from None
            if "DEADLINE_EXCEEDED" in status or "Deadline" in message:
                raise silent(c) from None
            raise refused(c, message, status) from None
        if isinstance(exc, TimeoutError) or type(exc).__name__ == "Timeout":  # gevent.Timeout is a BaseException
            raise silent(c) from None
        if isinstance(exc, http.client.HTTPException):  # geventhttpclient's parse errors: not an HTTP server
            raise wrong_protocol(c) from None
        if isinstance(exc, socket.gaierror):
            raise unresolved(c) from None
        if isinstance(exc, OSError):
            raise unreachable(c) from None
        return False
