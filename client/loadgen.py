"""The load generator behind `loraship bench`: what perf_analyzer does, in Python.

Each concurrency slot is a worker that keeps its own connection for the whole level and sends its
next request as soon as the previous one's last response is in: over gRPC one bidirectional
``ModelStreamInfer`` stream on its own channel (as perf_analyzer's ``--streaming``), over HTTP one
keep-alive aiohttp session streaming the generate extension's server-sent events. All workers run
in one asyncio loop, so no threads contend for the GIL. Requests are serialized before the clock
starts; a response is only timestamped and kept as it arrives, and decoded once its request is over.

tritonclient's stream API, which `Client.stream` uses, costs far more per request: a new stream and
a reader thread for each request, every response handed through a callback and a queue to a
consumer thread that deserializes all its outputs before it reads the clock. Measured that way,
a 1.3 ms time to first token read as 2.4 ms.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from loraship.client.client import Client
from loraship.client.errors import EndpointError, unreachable
from loraship.client.sampling import Prompt, SamplingOptions


@dataclass(frozen=True)
class RequestResult:
    """One streamed request, as the client saw it."""

    ok: bool
    ttft_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency after the first token, or None for single-token replies."""
        if self.completion_tokens < 2:
            return None
        return (self.total_s - self.ttft_s) / (self.completion_tokens - 1)


def infer_request(model: str, inputs: dict[str, tuple[str, Any]]) -> Any:
    """A ``ModelInferRequest`` (tritonclient's protobuf) from ``name -> (datatype, value)``, with an
    empty final response enabled so every request ends in a response flagged final."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import triton_to_np_dtype

    request = service_pb2.ModelInferRequest(model_name=model)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, (datatype, value) in inputs.items():
        items = value if isinstance(value, list) else [value]
        request.inputs.add(name=name, datatype=datatype, shape=[len(items)])
        if datatype == "BYTES":
            encoded = [v.encode() if isinstance(v, str) else bytes(v) for v in items]
            request.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in encoded))
        else:
            request.raw_input_contents.append(np.array(items, dtype=triton_to_np_dtype(datatype)).tobytes())
    return request


def _int_outputs(response: Any, names: tuple[str, ...] = ("prompt_tokens", "completion_tokens")) -> dict[str, int]:
    """The INT32 ``names`` among a ModelInferResponse's raw outputs."""
    found = {}
    for i, output in enumerate(response.outputs):
        if output.name in names and i < len(response.raw_output_contents):
            found[output.name] = int(np.frombuffer(response.raw_output_contents[i], np.int32)[0])
    return found


def request_result(start: float, times: list[float], counts: list[dict[str, int]], error: str | None = None) -> RequestResult:
    """One finished request from its responses' arrival times and token counts: TTFT is the first
    response that carries a token (perf_analyzer's first response), the total the last response."""
    if error:
        return RequestResult(False, error=error.strip().splitlines()[0])
    last = next((c for c in reversed(counts) if "prompt_tokens" in c and "completion_tokens" in c), None)
    if last is None:
        return RequestResult(False, error="the response carries no prompt_tokens/completion_tokens counts")
    first = next((i for i, c in enumerate(counts) if c.get("completion_tokens", 0) > 0), len(times) - 1)
    return RequestResult(True, times[first] - start, times[-1] - start, last["prompt_tokens"], last["completion_tokens"])


def grpc_result(start: float, times: list[float], messages: list[Any]) -> RequestResult:
    """`request_result` of a gRPC stream's ``ModelStreamInferResponse`` messages."""
    error = next((m.error_message for m in messages if m.error_message), None)
    return request_result(start, times, [_int_outputs(m.infer_response) for m in messages], error)


def sse_result(start: float, times: list[float], events: list[bytes]) -> RequestResult:
    """`request_result` of the generate extension's server-sent ``data:`` payloads."""
    counts = []
    for event in events:
        try:
            data = json.loads(event)
        except ValueError:
            return RequestResult(False, error=f"a non-JSON event: {event[:200]!r}")
        if "error" in data:
            return request_result(start, times, [], str(data["error"]))
        counts.append({k: int(data[k]) for k in ("prompt_tokens", "completion_tokens") if k in data})
    return request_result(start, times, counts)


class _Slots:
    """Hands out request indices until ``requests`` are issued or ``duration_s`` has passed."""

    def __init__(self, requests: int | None, duration_s: float | None) -> None:
        self.requests, self.duration_s = requests, duration_s
        self.issued = 0
        self.start = time.perf_counter()

    def take(self) -> int | None:
        if self.requests is not None and self.issued >= self.requests:
            return None
        if self.duration_s is not None and time.perf_counter() - self.start >= self.duration_s:
            return None
        self.issued += 1
        return self.issued - 1


class _Transport(Protocol):
    """A level's connections: one per worker, each sending its next request when the last one is over."""

    async def open(self) -> None: ...

    async def request(self, worker: int, payload: Any) -> RequestResult: ...

    async def close(self) -> None: ...


class _Grpc:
    """One channel and one persistent decoupled stream per worker."""

    def __init__(self, client: Client, workers: int) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.grpc, self.client = grpc, client
        options = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
        target = f"{client.host}:{client.port}"
        self.channels = [
            grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options) if client.ssl
            else grpc.aio.insecure_channel(target, options)
            for _ in range(workers)
        ]
        self.stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in self.channels]
        self.calls: list[Any] = [None] * workers
        self.metadata = tuple((k.lower(), v) for k, v in client.headers.items())
        self.waiting: dict[int, float] = {}  # worker -> time of its last send or response
        self.expired: set[int] = set()  # workers whose stream the watchdog cancelled
        self.guard: asyncio.Future | None = None

    async def open(self) -> None:
        await asyncio.gather(*(c.channel_ready() for c in self.channels))
        self.guard = asyncio.ensure_future(self._watchdog())

    async def request(self, worker: int, request: Any) -> RequestResult:
        grpc = self.grpc
        if self.calls[worker] is None:
            self.calls[worker] = self.stubs[worker].ModelStreamInfer(metadata=self.metadata)
        call = self.calls[worker]
        times: list[float] = []
        messages: list[Any] = []
        start = self.waiting[worker] = time.perf_counter()
        try:
            await call.write(request)
            while True:
                message = await call.read()
                now = time.perf_counter()
                if message is grpc.aio.EOF:
                    raise EndpointError(f"{self.client.url} closed the stream mid-request", "check the server's log")
                times.append(now)
                messages.append(message)
                self.waiting[worker] = now
                if message.error_message or message.infer_response.parameters["triton_final_response"].bool_param:
                    break
        except asyncio.CancelledError:
            self.calls[worker] = None
            if worker not in self.expired:  # the level itself is cancelled (Ctrl-C): stop, count nothing
                call.cancel()
                raise
            return RequestResult(False, error=f"no response within {self.client.timeout:g} s")
        except (grpc.aio.AioRpcError, EndpointError) as exc:
            self.calls[worker] = None
            return RequestResult(False, error=await self._stream_error(call, exc, worker))
        finally:
            self.waiting.pop(worker, None)
            self.expired.discard(worker)
        return grpc_result(start, times, messages)

    async def _stream_error(self, call: Any, exc: BaseException, worker: int) -> str:
        """Why a stream failed: the RPC's status, or a timeout where the watchdog cancelled it."""
        if isinstance(exc, EndpointError):
            call.cancel()
            return str(exc)
        code = await call.code()
        if code == self.grpc.StatusCode.CANCELLED:
            return f"no response within {self.client.timeout:g} s"
        details = (await call.details() or str(code)).strip().splitlines()[0]
        if code == self.grpc.StatusCode.INTERNAL:  # the send lost a race with the server ending the stream
            return f"the server ended the stream before the request went out ({await self._refusal(worker) or details})"
        return details

    async def _refusal(self, worker: int) -> str | None:
        """Why the server ends a stream as it opens (a refused key, say): a fresh stream, read without a
        write, ends with the server's own status, which a write that lost the race hides behind INTERNAL."""
        probe = self.stubs[worker].ModelStreamInfer(metadata=self.metadata)
        try:
            await asyncio.wait_for(probe.read(), timeout=2.0)
        except self.grpc.aio.AioRpcError as exc:
            return (exc.details() or "").strip().splitlines()[0] or None
        except asyncio.TimeoutError:
            pass
        finally:
            probe.cancel()
        return None

    async def _watchdog(self) -> None:
        """Cancel a stream that has waited ``timeout`` seconds for a response."""
        while True:
            await asyncio.sleep(min(1.0, self.client.timeout / 4))
            now = time.perf_counter()
            for worker, since in list(self.waiting.items()):
                if now - since > self.client.timeout and self.calls[worker] is not None:
                    self.expired.add(worker)
                    self.calls[worker].cancel()

    async def close(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
        for call in self.calls:
            if call is not None:
                await call.done_writing()
        await asyncio.gather(*(c.close() for c in self.channels))


class _Http:
    """One keep-alive aiohttp session per worker on the generate extension's ``generate_stream``."""

    def __init__(self, client: Client, workers: int) -> None:
        import aiohttp

        self.aiohttp, self.client = aiohttp, client
        self.url = f"{client.url}/v2/models/{client.model}/generate_stream"
        self.headers = {"Content-Type": "application/json", **client.headers}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=client.timeout, sock_read=client.timeout)
        self.sessions = [aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1)) for _ in range(workers)]

    async def open(self) -> None:
        try:
            await asyncio.gather(*(s.get(f"{self.client.url}/v2/health/live") for s in self.sessions))  # connect now
        except (self.aiohttp.ClientError, OSError) as exc:
            raise EndpointError(f"cannot reach Triton at {self.client.url} (http): {exc}", "start it with `loraship serve --repo REPO`, or check --url") from None

    async def request(self, worker: int, body: bytes) -> RequestResult:
        times: list[float] = []
        events: list[bytes] = []
        start = time.perf_counter()
        try:
            async with self.sessions[worker].post(self.url, data=body, headers=self.headers) as response:
                if response.status != 200:
                    text = (await response.text()).strip()
                    try:
                        text = str(json.loads(text).get("error", text))
                    except ValueError:
                        pass
                    return RequestResult(False, error=f"HTTP {response.status}: {text}".splitlines()[0])
                async for line in response.content:
                    if line.startswith(b"data:"):
                        times.append(time.perf_counter())
                        events.append(line[5:])
        except asyncio.TimeoutError:
            return RequestResult(False, error=f"no response within {self.client.timeout:g} s")
        except (self.aiohttp.ClientError, OSError) as exc:
            return RequestResult(False, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        return sse_result(start, times, events)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions))


async def _level(
    client: Client,
    payloads: Sequence[Any],
    concurrency: int,
    count: int | None,
    duration_s: float | None,
    on_done: Callable[[RequestResult], None] | None,
) -> tuple[list[RequestResult], float]:
    transport: _Transport = _Grpc(client, concurrency) if client.protocol == "grpc" else _Http(client, concurrency)
    results: list[RequestResult] = []

    async def worker(index: int) -> None:
        while (n := slots.take()) is not None:
            result = await transport.request(index, payloads[n % len(payloads)])
            results.append(result)
            if on_done is not None:
                on_done(result)

    try:
        try:
            await asyncio.wait_for(transport.open(), client.timeout)
        except asyncio.TimeoutError:
            raise unreachable(client) from None
        slots = _Slots(count, duration_s)
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return results, time.perf_counter() - slots.start
    finally:
        await transport.close()


def run_level(
    client: Client,
    prompts: Sequence[Prompt],
    concurrency: int,
    options: SamplingOptions,
    requests: int | None = None,
    duration_s: float | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """``concurrency`` workers send streamed requests for ``prompts`` in turn until ``requests`` are
    done or ``duration_s`` has passed; returns the results and the wall time. ``options`` say how to generate."""
    if client.protocol == "grpc":
        payloads = [infer_request(client.model, client.request_inputs(p, options, stream=True)) for p in prompts]
    else:
        payloads = [json.dumps({k: v for k, (_, v) in client.request_inputs(p, options, stream=True).items()}).encode() for p in prompts]
    return asyncio.run(_level(client, payloads, concurrency, requests, duration_s, on_done))
