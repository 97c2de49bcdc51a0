"""Triton python-backend generate model (decoupled), copied into each version by `loraship repo`.

Each instance loads the version's ONNX folder with the bundled ``loraship_engine`` and runs
its in-flight batching scheduler: ``execute`` only hands each request to a preparation thread
(chat template, byte bound, tokenizing, checks), which queues it, and the scheduler thread answers
it through its response sender. A watchdog ends the process when the scheduler has work but
finishes no step for ``hang_timeout`` seconds, so the server restarts the model.

Inputs and outputs: ``loraship_contract.INPUTS`` and ``OUTPUTS`` (copied beside this file), read by
``loraship_inputs``. The prompt is text_input, messages (a JSON chat rendered with the export's chat
template and the generation prompt) or input_ids. The model takes loraship's own names, TensorRT-LLM's
ensemble's (exclude_input_in_output, random_seed, stop_words, min_length) and vLLM's backend's
(sampling_parameters, a JSON object; return_num_input_tokens / return_num_output_tokens), so genai-perf
works unchanged with either --backend, and so does Triton's OpenAI frontend with --backend vllm (its
TensorRT-LLM format sends [1, 1] tensors, for a batching model, where this model's inputs are [1]).
Without max_tokens a request gets the repository's default, or the room its context has left if that
is less. logprobs / prompt_logprobs k: each generated (prompt) token's log-probability and the k most
likely tokens at its position, as JSON (the first prompt token has null logprob and top_logprobs).
num_input_tokens / num_output_tokens, logprobs and prompt_logprobs are answered only when asked for;
num_output_tokens counts that response's tokens.
exclude_input_in_output=false puts the prompt before the generated text (in the first response when
streaming); leaving it out means true.
stream=true: one response per generated token (its text delta; when many streams outpace the
sender, the tokens already waiting for a request go out as one response), then a final response with
empty text, the counts and finish_reason. stream=false: exactly one response with everything.

Adapters (issue 19; an export with LoRA slots): a request chooses one by name as Triton's vLLM backend
takes it, ``lora_name`` in sampling_parameters or the request parameter ``lora_name`` (absent or empty:
the base); a name the model does not serve is refused with its own error (the OpenAI frontend answers 404).
The set is the model folder's ``multi_lora.json``, read at load and again whenever it changes (a thread
polls it every ``ADAPTER_POLL_S``; an entry that cannot be loaded is refused in one log line while the
others serve; requests already running on an adapter that is removed finish on it). A request with the
parameter ``loraship_adapters`` is answered at once, off the decode loop, with the adapters served (JSON).

Why one module of ~450 lines: Triton's python backend loads this one file as the model; request parsing is
already apart (``loraship_inputs``), and what is left is one class whose methods share its state (the engine,
the scheduler, the preparation threads, the metrics, the adapter registry's watcher).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loraship_contract import (  # noqa: E402
    ADAPTERS_QUERY,
    DEFAULT_HANG_TIMEOUT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_TOKENS,
    PROMPT_INPUTS,
    REGISTRY_FILE,
)
from loraship_engine import Engine, RequestError  # noqa: E402
from loraship_engine.adapter_registry import RegistryWatcher  # noqa: E402
from loraship_engine.chat import ChatTemplate, parse_messages  # noqa: E402
from loraship_engine.errors import one_line  # noqa: E402
from loraship_engine.integrity import check_export  # noqa: E402
from loraship_engine.scheduler import Watchdog  # noqa: E402
from loraship_inputs import (  # noqa: E402
    Inputs,
    Options,
    adapter_name,
    request_parameters,
    sampling_params,
    text,
    unknown_parameter,
)

if TYPE_CHECKING:
    from loraship_engine import Completion, TokenLogprob
    from loraship_engine.scheduler import Scheduler

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PREP_THREADS = 2  # requests prepared at once: a long prompt being tokenized does not hold up a short one
ADAPTER_POLL_S = 0.25  # seconds between looks at multi_lora.json (its inode, mtime and size)
JSON_ESCAPE = 6  # a character of JSON text takes at most 6 bytes (\u0001) for each UTF-8 byte it stands for
#: What the scheduler thread queues for the outbox: (reply, text delta, count, logprob, completion, error);
#: a token carries the first four, the end the last two. None ends the outbox thread.
OutboxItem = tuple[Any, str | None, int | None, Any, Any, BaseException | None] | None


def _error(exc: BaseException) -> pb_utils.TritonError:
    """A request's error response: a RequestError is the client's (INVALID_ARG: HTTP 400), anything
    else the model's (INTERNAL: HTTP 500); one line either way."""
    if isinstance(exc, RequestError):
        message, code = str(exc), "INVALID_ARG"
    else:
        message, code = f"the model failed on this request: {one_line(exc)}", "INTERNAL"
    try:
        return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    except (AttributeError, TypeError):  # older python backends: message only
        return pb_utils.TritonError(message)


def _inputs(request: pb_utils.InferenceRequest) -> Inputs:
    """The request's input tensors as numpy arrays of their own (flattened), so they outlive ``execute``."""
    return {tensor.name(): np.array(tensor.as_numpy()).reshape(-1) for tensor in request.inputs()}


class _Metrics:
    """This model's own metrics on Triton's /metrics, labelled with model and version: its counters, and
    in-flight batching at work (decode steps, the requests they ran, and the most one step ran together),
    read from the scheduler and published as each request ends (one IPC call per metric, never per step)."""

    def __init__(self, model: str, version: str, scheduler: Callable[[], Scheduler]) -> None:
        labels = {"model": model, "version": str(version)}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.families = [
            pb_utils.MetricFamily(name="loraship_completion_tokens", description="Tokens generated, cancelled requests included",
                                  kind=counter),
            pb_utils.MetricFamily(name="loraship_requests_cancelled", description="Requests stopped because the client went away or cancelled",
                                  kind=counter),
            pb_utils.MetricFamily(name="loraship_decode_steps", description="Decode steps run", kind=counter),
            pb_utils.MetricFamily(name="loraship_decode_rows", description="Requests run by the decode steps, summed over steps",
                                  kind=counter),
            pb_utils.MetricFamily(name="loraship_active_rows_peak", description="Most requests one decode step has run together",
                                  kind=gauge),
        ]
        self.tokens, self.cancelled, self.steps, self.rows, self.peak = (family.Metric(labels=labels) for family in self.families)
        self.scheduler = scheduler
        self.published = (0, 0)  # (steps, rows) already counted

    def finished(self, completion_tokens: int, cancelled: bool) -> None:
        self.tokens.increment(completion_tokens)
        if cancelled:
            self.cancelled.increment(1)
        scheduler = self.scheduler()
        steps, rows = scheduler.steps, scheduler.rows_stepped
        self.steps.increment(steps - self.published[0])
        self.rows.increment(rows - self.published[1])
        self.published = (steps, rows)
        self.peak.set(scheduler.peak_active)


class _Reply:
    """The response sender of one request. The scheduler thread only queues events for it;
    the outbox thread builds and sends the responses, so decode steps never wait on IPC."""

    CANCEL_CHECK_EVERY = 16  # tokens between is_cancelled() round trips to the server

    def __init__(self, sender: pb_utils.InferenceResponseSender, options: Options, echo: str, prompt_tokens: int,
                 outbox: queue.SimpleQueue[OutboxItem], metrics: _Metrics, logprobs: bool,
                 first_prompt_token: dict[str, Any] | None = None) -> None:
        self.sender = sender
        self.logprobs = logprobs  # the request asked for them: each response carries its tokens' entries
        self.first_prompt_token = first_prompt_token  # prompt_logprobs' first entry: the token, with no logprob
        self.metrics = metrics
        self.options = options
        self.stream = options.stream
        self.echo = echo  # the prompt's text when it is echoed: goes before the first text sent
        self.prompt_tokens = prompt_tokens
        self.outbox = outbox
        self.completion_tokens = 0
        self.checked = 0  # completion_tokens at the last is_cancelled() check
        self.sent = 0  # completion tokens already counted in responses
        self.seq: Any = None  # the scheduler's handle of this request (cancel())

    # -- scheduler thread: cheap, never raises --
    def on_token(self, token_id: int, delta: str, logprob: TokenLogprob | None) -> None:
        self.completion_tokens += 1
        if self.stream:
            self.outbox.put((self, delta, self.completion_tokens, logprob, None, None))

    def on_done(self, completion: Completion | None, error: BaseException | None) -> None:
        self.outbox.put((self, None, None, None, completion, error))

    # -- outbox thread --
    def deliver(self, delta: str | None, count: int | None, logprobs: list[TokenLogprob] | None,
                completion: Completion | None, error: BaseException | None) -> None:
        if delta is not None:
            if count - self.checked >= self.CANCEL_CHECK_EVERY:
                self.checked = count
                if self.sender.is_cancelled():
                    self.cancel()
                    return
            self._send(self._response(delta, count, logprobs=logprobs))
            return
        self.metrics.finished(self.completion_tokens, error is None and completion.finish_reason == "cancelled")
        if error is not None:
            self._send(pb_utils.InferenceResponse(error=_error(error)), FINAL)
        elif completion.finish_reason == "cancelled":
            self._send(None, FINAL)
        else:
            final, logprobs = ("", []) if self.stream else (completion.text, completion.logprobs)
            self._send(self._response(final, completion.completion_tokens, completion.finish_reason, logprobs,
                                      completion.prompt_logprobs), FINAL)

    def cancel(self) -> None:
        if self.seq is not None:
            self.seq.cancel()

    def _send(self, response: pb_utils.InferenceResponse | None, flags: int = 0) -> None:
        try:
            self.sender.send(response, flags=flags)
        except Exception:  # noqa: BLE001 - the client went away: drop only this request
            self.cancel()

    def _response(self, delta: str, completion_tokens: int, finish_reason: str | None = None,
                  logprobs: list[TokenLogprob] | tuple[()] | None = (),
                  prompt_logprobs: list[TokenLogprob | None] | None = None) -> pb_utils.InferenceResponse:
        delta, self.echo = self.echo + delta, ""
        tensors = [
            _tensor("text_output", delta.encode("utf-8"), np.object_),
            _tensor("prompt_tokens", self.prompt_tokens, np.int32),
            _tensor("completion_tokens", completion_tokens, np.int32),
        ]
        if finish_reason is not None:
            tensors.append(_tensor("finish_reason", finish_reason.encode("utf-8"), np.object_))
        if self.options.num_input_tokens:
            tensors.append(_tensor("num_input_tokens", self.prompt_tokens, np.uint32))
        if self.options.num_output_tokens:
            tensors.append(_tensor("num_output_tokens", completion_tokens - self.sent, np.uint32))
        if self.logprobs:
            tensors.append(_tensor("logprobs", json.dumps([_logprob_entry(lp) for lp in logprobs or ()]).encode("utf-8"), np.object_))
        if prompt_logprobs is not None:
            entries = [self.first_prompt_token if lp is None else _logprob_entry(lp) for lp in prompt_logprobs]
            tensors.append(_tensor("prompt_logprobs", json.dumps(entries).encode("utf-8"), np.object_))
        self.sent = completion_tokens
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _tensor(name: str, value: Any, dtype: type) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([value], dtype=dtype))


def _logprob_entry(lp: TokenLogprob) -> dict[str, Any]:
    """A TokenLogprob as the logprobs output's JSON entry."""
    return {"token_id": lp.token, "token": lp.text, "logprob": lp.logprob,
            "top_logprobs": [{"token_id": i, "token": token, "logprob": value} for i, token, value in lp.top]}


def _deliver_forever(outbox: queue.SimpleQueue[OutboxItem]) -> None:
    """Send queued events in order. When the outbox has fallen behind (many streams at once),
    the token events already waiting for one request go out as one response carrying their
    joined text and the latest count, so response overhead cannot throttle decoding."""
    while True:
        events = [outbox.get()]
        while True:
            try:
                events.append(outbox.get_nowait())
            except queue.Empty:
                break
        tokens: dict[_Reply, list[Any]] = {}  # reply -> [joined delta, latest count, logprobs], in order of first arrival
        for item in events:
            if item is None:
                _flush(tokens)
                return
            reply, delta, count, logprob, completion, error = item
            if delta is not None:
                joined = tokens.setdefault(reply, ["", count, []])
                joined[0] += delta
                joined[1] = count
                if logprob is not None:
                    joined[2].append(logprob)
            else:
                if reply in tokens:
                    reply.deliver(*tokens.pop(reply), None, None)
                reply.deliver(None, None, None, completion, error)
        _flush(tokens)


def _flush(tokens: dict[_Reply, list[Any]]) -> None:
    for reply, (delta, count, logprobs) in tokens.items():
        reply.deliver(delta, count, logprobs, None, None)


class TritonPythonModel:
    """The generate model: Triton calls ``initialize`` once per instance, ``execute`` per batch of requests
    (one here: max_batch_size 0), ``finalize`` at unload."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))
        provider = params.get("provider", "cpu")
        max_batch = int(params.get("max_batch", DEFAULT_MAX_BATCH))
        # No spinning ONNX Runtime threads: they would starve this stub's response threads.
        load_args: dict[str, Any] = {"provider": provider, "max_batch": max_batch, "spin": False}
        if params.get("threads"):
            load_args["threads"] = int(params["threads"])
        if params.get("max_context"):
            load_args["max_context"] = int(params["max_context"])
        if provider != "cpu":
            load_args["device_id"] = int(args.get("model_instance_device_id") or 0)
        if params.get("cuda_graph") == "1":
            load_args["cuda_graph"] = True
        if params.get("kv_budget_gb"):
            load_args["kv_budget_gb"] = float(params["kv_budget_gb"])
        if provider == "tensorrt":
            load_args["trt_fp16"] = params.get("trt_fp16") == "1"
            if params.get("trt_cache_dir"):
                load_args["trt_cache_dir"] = params["trt_cache_dir"]
            if params.get("trt_profile"):
                load_args["trt_profile"] = tuple(int(x) for x in params["trt_profile"].split(":"))
        onnx_dir = os.path.join(here, params.get("onnx_dir", "onnx"))
        # sizes only (hashing gigabytes would slow every start): a missing or truncated file fails here, in one line
        check_export(onnx_dir, hashes=False, fix="re-run `loraship export`, then `loraship repo`")
        self.engine = Engine.load(onnx_dir, **load_args)
        self.chat = ChatTemplate.load(onnx_dir)
        self.default_max_tokens = int(params.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        self.name = args["model_name"]
        self.metrics = _Metrics(args["model_name"], args["model_version"], lambda: self.scheduler)
        self.outbox: queue.SimpleQueue[OutboxItem] = queue.SimpleQueue()
        self.sender_thread = threading.Thread(target=_deliver_forever, args=(self.outbox,), name="loraship-outbox", daemon=True)
        self.sender_thread.start()
        self.scheduler = self.engine.scheduler()
        self.adapters = self._watch_adapters(os.path.join(os.path.dirname(here), REGISTRY_FILE))
        self.prep = ThreadPoolExecutor(max_workers=PREP_THREADS, thread_name_prefix="loraship-prep")
        hang_timeout = float(params.get("hang_timeout", DEFAULT_HANG_TIMEOUT_S))
        self.watchdog = Watchdog(self.scheduler, hang_timeout, _exit_hung) if hang_timeout > 0 else None
        plan = self.engine.kv_plan
        pb_utils.Logger.log_info(
            f"loraship: {args['model_name']} v{args['model_version']} on {self.engine.providers}, "
            f"context {self.engine.max_context}, in-flight batch {self.engine.max_batch}"
            + (f"; {plan.describe()}" if plan else "") + f"; {self.engine.text_bound.describe()}"
            + (f"; hang_timeout {hang_timeout:g} s" if hang_timeout > 0 else "")
            + (f"; {self.engine.adapters.describe()}" if self.engine.adapters is not None else "")
        )

    def _watch_adapters(self, registry: str) -> RegistryWatcher | None:
        """Serve the adapters the model folder's multi_lora.json names, re-read when it changes (a thread that
        polls it, off the decode loop); None for an export without LoRA slots (a registry file is then ignored)."""
        if self.engine.adapters is None:
            if os.path.isfile(registry):
                pb_utils.Logger.log_warn(f"loraship: {registry} ignored: this version's export has no LoRA slots "
                                         "(export the base with `loraship export --max-adapters N`)")
            return None
        return RegistryWatcher(self.engine.adapters, registry, interval=ADAPTER_POLL_S, log=pb_utils.Logger.log_info,
                               warn=pb_utils.Logger.log_warn).start()

    def _answer_adapters_query(self, sender: pb_utils.InferenceResponseSender) -> None:
        """The adapters this instance serves now, as JSON in text_output (the frontend's /v1/models lists them);
        answered here at once, never queued behind the decode loop."""
        served = {"model": self.name, "slots": 0, "adapters": [], "failed": {}, "synced": None, "error": None}
        if self.adapters is not None:
            served.update(slots=self.engine.adapters.layout.slots, adapters=self.engine.adapters.names(),
                          failed=dict(self.adapters.failed), synced=self.adapters.synced, error=self.adapters.error)
        response = pb_utils.InferenceResponse(output_tensors=[_tensor("text_output", json.dumps(served).encode(), np.object_)])
        sender.send(response, flags=FINAL)

    def _prompt(self, inputs: Inputs) -> tuple[list[int], str | None]:
        """The request's prompt as token ids, and its text where it came as text (to echo it)."""
        given = [name for name in PROMPT_INPUTS if inputs.get(name) is not None]
        if len(given) > 1:
            raise RequestError(f"send one of text_input, messages or input_ids, not {' and '.join(given)}")
        if given == ["messages"]:
            return self._chat_prompt(inputs), None
        if given == ["input_ids"]:
            ids = inputs["input_ids"]
            if ids.size == 0:
                raise RequestError("input_ids is empty: send the prompt's token ids")
            return ids.tolist(), None
        prompt = self._text_prompt(inputs)
        return self.engine.encode(prompt), prompt

    def _chat_prompt(self, inputs: Inputs) -> list[int]:
        """Token ids of the ``messages`` input rendered with the model's chat template."""
        values = inputs["messages"]
        if values.size != 1:
            raise RequestError(f"messages must hold one JSON list of {{role, content}} objects, got {values.size} values")
        if self.chat is None:
            raise RequestError("this model has no chat template (its export has no chat_template.jinja and no chat_template "
                               "in tokenizer_config.json): send the prompt as text_input")
        self.engine.text_bound.check(values[0], "messages", scale=JSON_ESCAPE)  # before it is parsed
        rendered = self.chat.render(parse_messages(text(values[0], "messages")))
        return self.engine.encode(rendered, add_special_tokens=False, what="messages")  # as ChatTemplate.encode, bounded

    def _text_prompt(self, inputs: Inputs) -> str:
        values = inputs.get("text_input")
        if values is None or values.size == 0:
            raise RequestError("text_input is required: send the prompt text (or messages, for a chat, or input_ids, its token ids)")
        if values.size != 1:
            raise RequestError(f"text_input must hold one prompt, got {values.size}; send one request per prompt")
        self.engine.text_bound.check(values[0], "text_input")  # before it is decoded
        prompt = text(values[0], "text_input")
        if not prompt:
            raise RequestError("empty prompt: send a non-empty text_input")
        return prompt

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        """Hand each request to a preparation thread and return: chat templates, tokenizing and validation
        never hold up this thread, and the tokenizer lets the scheduler thread decode meanwhile."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                parameters = request_parameters(request)
                if parameters.get(ADAPTERS_QUERY):
                    self._answer_adapters_query(sender)
                    continue
                unknown = unknown_parameter(parameters)
                if unknown is not None:
                    raise RequestError(f"{unknown} is not an input of this model; GET /v2/models/{self.name}/config lists the inputs it takes")
                self.prep.submit(self._admit, _inputs(request), parameters, sender)
            except Exception as exc:  # noqa: BLE001 - answer, and keep serving
                _send_error(sender, exc)
        return None

    def _admit(self, inputs: Inputs, parameters: dict[str, Any], sender: pb_utils.InferenceResponseSender) -> None:
        """Prepare one request (a preparation thread) and queue it; a bad one is answered with its error."""
        try:
            adapter = adapter_name(inputs, parameters)
            ids, prompt = self._prompt(inputs)
            room = self.engine.max_context - len(ids)  # no max_tokens: the default, or the room left if less
            params = sampling_params(inputs, min(self.default_max_tokens, room) if room > 0 else self.default_max_tokens)
            options = Options(inputs)
            echo = "" if not options.echo else prompt if prompt is not None else self.engine.tokenizer.decode(ids, skip_special_tokens=False)
            first = None
            if params.prompt_logprobs is not None:
                first = {"token_id": ids[0], "token": self.engine.tokenizer.decode(ids[:1], skip_special_tokens=False),
                         "logprob": None, "top_logprobs": None}
            reply = _Reply(sender, options, echo, len(ids), self.outbox, self.metrics, params.logprobs is not None, first)
            reply.seq = self.scheduler.submit(ids, params, reply.on_token, reply.on_done, adapter=adapter)
        except Exception as exc:  # noqa: BLE001 - answer, and keep serving
            _send_error(sender, exc)

    def finalize(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.adapters is not None:
            self.adapters.stop()
        self.prep.shutdown(wait=True)  # requests being prepared are queued (or answered) first
        self.scheduler.close()  # ends what is still running; its final responses are queued
        self.outbox.put(None)
        self.sender_thread.join(timeout=30)


def _send_error(sender: pb_utils.InferenceResponseSender, exc: BaseException) -> None:
    try:
        sender.send(pb_utils.InferenceResponse(error=_error(exc)), flags=FINAL)
    except Exception:  # noqa: BLE001 - the client went away
        pass


def _exit_hung(message: str) -> None:
    """The watchdog's verdict: log it, then end this stub process; Triton reports the model unhealthy and
    the supervisor (`loraship serve`, the container's start script) restarts it."""
    pb_utils.Logger.log_error(message)
    time.sleep(1)  # the log line travels to the server on another thread
    os._exit(1)
