"""Triton python-backend generate model (decoupled), copied into each version by `loraship repo`.

Each instance loads the version's ONNX folder with the bundled ``loraship_engine`` and runs
its in-flight batching scheduler: ``execute`` only hands each request to a preparation thread
(chat template, byte bound, tokenizing, checks), which queues it, and the scheduler thread answers
it through its response sender. A watchdog ends the process when the scheduler has work but
finishes no step for ``hang_timeout`` seconds, so the server restarts the model.

Inputs: text_input (BYTES), messages (BYTES: a JSON list of {role, content}, rendered with the
export's chat template and the generation prompt) or input_ids (INT32, token ids), optional
max_tokens (INT32), stream (BOOL),
temperature (FP32), top_p (FP32), top_k (INT32), seed (UINT64), stop (BYTES, any count),
repetition_penalty / presence_penalty / frequency_penalty (FP32), ignore_eos (BOOL), logprobs (INT32 k:
each generated token's log-probability and the k most likely tokens at its position), prompt_logprobs
(INT32 k: the same for each prompt token after the first, given the ones before it). The same model
also takes the names of TensorRT-LLM's ensemble (exclude_input_in_output, random_seed, stop_words,
min_length) and of vLLM's backend (sampling_parameters, a JSON object; return_num_input_tokens /
return_num_output_tokens), so genai-perf works unchanged with either --backend, and so does Triton's
OpenAI frontend with --backend vllm (its TensorRT-LLM format sends [1, 1] tensors, for a batching
model, where this model's inputs are [1]). Without max_tokens a request gets the repository's default,
or the room its context has left if that is less.
Outputs: text_output (BYTES), prompt_tokens / completion_tokens (INT32), finish_reason (BYTES), and on
request num_input_tokens / num_output_tokens (UINT32; num_output_tokens counts that response's tokens),
logprobs (BYTES: a JSON list, one {token_id, token, logprob, top_logprobs} per token of that response)
and prompt_logprobs (BYTES, in the last response: the same per prompt token; the first has null
logprob and top_logprobs).
exclude_input_in_output=false puts the prompt before the generated text (in the first response when
streaming); leaving it out means true.
stream=true: one response per generated token (its text delta; when many streams outpace the
sender, the tokens already waiting for a request go out as one response), then a final response with
empty text, the counts and finish_reason. stream=false: exactly one response with everything.
"""

import json
import math
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loraship_engine import Engine, RequestError, SamplingParams  # noqa: E402
from loraship_engine.chat import ChatTemplate, parse_messages  # noqa: E402
from loraship_engine.errors import one_line  # noqa: E402
from loraship_engine.integrity import check_export  # noqa: E402
from loraship_engine.scheduler import Watchdog  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PREP_THREADS = 2  # requests prepared at once: a long prompt being tokenized does not hold up a short one
DEFAULT_HANG_TIMEOUT = "120"  # seconds with work and no finished decode step before the stub ends itself
JSON_ESCAPE = 6  # a character of JSON text takes at most 6 bytes (\u0001) for each UTF-8 byte it stands for


def _error(exc):
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


def _inputs(request):
    """The request's input tensors as numpy arrays of their own (flattened), so they outlive ``execute``."""
    return {tensor.name(): np.array(tensor.as_numpy()).reshape(-1) for tensor in request.inputs()}


# Request parameters Triton defines ("id": the generate extension passes a body's request id as one). Any
# other parameter is a key of a /generate JSON body that names no input (gRPC refuses an unknown input
# itself; HTTP's generate extension passes it on as a parameter).
_TRITON_PARAMETERS = {"id", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output"}


def _unknown_parameter(request):
    """The first parameter of ``request`` that is neither Triton's nor an input (HTTP's beam_width), or None."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (AttributeError, TypeError, ValueError):
        return None
    return next((k for k in sorted(parameters) if k not in _TRITON_PARAMETERS and not k.startswith("triton_")), None)


def _scalar(inputs, name, default, cast):
    values = inputs.get(name)
    if values is None:
        return default
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got {values.size}")
    return cast(values[0])


def _text(value, name):
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{name} is not valid UTF-8 text") from None


def _tensor(name, value, dtype):
    return pb_utils.Tensor(name, np.array([value], dtype=dtype))


# -- request inputs: loraship's own names, TensorRT-LLM's ensemble names, vLLM's sampling_parameters --

# Input tensor -> (SamplingParams field, cast).
_SAMPLING_INPUTS = {
    "max_tokens": ("max_tokens", int),
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "seed": ("seed", int),
    "random_seed": ("seed", int),  # TensorRT-LLM
    "min_length": ("min_tokens", int),  # TensorRT-LLM
    "repetition_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "ignore_eos": ("ignore_eos", bool),
    "logprobs": ("logprobs", int),
    "prompt_logprobs": ("prompt_logprobs", int),
}
_STOP_INPUTS = ("stop", "stop_words")  # loraship, TensorRT-LLM
# vLLM's sampling_parameters keys (SamplingParams fields of the same name) -> kind of value.
_VLLM_KEYS = {
    "max_tokens": "int", "min_tokens": "int", "temperature": "float", "top_p": "float", "top_k": "int",
    "seed": "uint64", "stop": "strings", "ignore_eos": "bool", "repetition_penalty": "float",
    "presence_penalty": "float", "frequency_penalty": "float",
}
# Keys taken only at the value that asks for nothing: Triton's OpenAI frontend (--backend vllm) sends
# every OpenAI field that has a default, so n, best_of, logprobs and logit_bias come with each request.
_VLLM_NEUTRAL = {"n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},)}


def _sampling_params(inputs, default_max_tokens):
    """SamplingParams from whichever convention the request uses; one value given twice is an error.
    A request without max_tokens gets ``default_max_tokens``."""
    given = {}  # field -> (value, where it came from)

    def put(field, value, where):
        if field in given:
            raise RequestError(f"{where} and {given[field][1]} both set {field}; send it once")
        given[field] = (value, where)

    for name, (field, cast) in _SAMPLING_INPUTS.items():
        value = _scalar(inputs, name, None, cast)
        if value is not None:
            put(field, value, name)
    for name in _STOP_INPUTS:
        values = inputs.get(name)
        if values is not None:
            put("stop", tuple(_text(s, name) for s in values), name)
    for key, value in _vllm_sampling_parameters(inputs).items():
        put(key, value, f"sampling_parameters.{key}")
    fields = {field: value for field, (value, _) in given.items()}
    fields.setdefault("max_tokens", default_max_tokens)
    return SamplingParams(**fields)


def _vllm_sampling_parameters(inputs):
    """The fields of a vLLM ``sampling_parameters`` JSON object. Like vLLM's Triton backend, numbers
    may come as strings (genai-perf sends ``{"max_tokens": "32"}``), nulls are left out, top_k -1 is off."""
    values = inputs.get("sampling_parameters")
    if values is None:
        return {}
    if values.size != 1:
        raise RequestError(f"sampling_parameters must hold one JSON object, got {values.size} values")
    text = _text(values[0], "sampling_parameters")
    try:
        params = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):
        raise RequestError('sampling_parameters is not valid JSON: send an object such as {"max_tokens": 32}') from None
    if not isinstance(params, dict):
        raise RequestError('sampling_parameters must be a JSON object, such as {"max_tokens": 32}')
    fields = {}
    for key, value in params.items():
        if key in _VLLM_NEUTRAL:
            _neutral(f"sampling_parameters.{key}", value, _VLLM_NEUTRAL[key])
            continue
        kind = _VLLM_KEYS.get(key)
        if kind is None:
            raise RequestError(f"sampling_parameters.{key} is not supported; use {', '.join(_VLLM_KEYS)}")
        if value is not None:
            fields[key] = _json_value(f"sampling_parameters.{key}", value, kind)
    if fields.get("top_k") == -1:
        fields["top_k"] = 0
    return fields


def _json_value(name, value, kind):
    """``value`` of a sampling_parameters key as the kind the engine takes."""
    if kind == "strings":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise RequestError(f"{name} must be a string or a list of strings")
        return tuple(items)
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, got {_short(value)}")
        return value
    try:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise ValueError
        number = float(value) if kind == "float" else int(value if isinstance(value, int) else str(value).strip())
    except (ValueError, OverflowError):
        raise RequestError(f"{name} must be {'a number' if kind == 'float' else 'an integer'}, got {_short(value)}") from None
    if kind == "float" and not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, got {_short(value)}")
    low, high, text = (0, 2**64, "[0, 2**64)") if kind == "uint64" else (-(2**31), 2**31, "[-2**31, 2**31)")
    if kind != "float" and not low <= number < high:
        raise RequestError(f"{name} must be in {text}, got {_short(value)}")
    return number


def _short(value):
    """``value`` as the error message shows it: at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _neutral(name, value, allowed):
    """Accept ``value`` only if it is null or asks for nothing (n=1, logprobs=false, ...); numbers and
    booleans may come as strings, as in the other keys."""
    if isinstance(value, str):
        try:
            value = json.loads(value.strip().lower())
        except ValueError:
            pass
    if value is None or any(type(value) is type(a) and value == a for a in allowed):
        return
    if allowed[0] == 1:
        raise RequestError(f"{name} must be 1: one completion per request")
    raise RequestError(f"{name} is not supported; leave it out or send {json.dumps(allowed[0])}")


class _Options:
    """How to answer a request: stream, echo the prompt, and the vLLM-style token counts."""

    def __init__(self, inputs):
        self.stream = bool(_scalar(inputs, "stream", False, bool))
        self.echo = not _scalar(inputs, "exclude_input_in_output", True, bool)
        self.num_input_tokens = bool(_scalar(inputs, "return_num_input_tokens", False, bool))
        self.num_output_tokens = bool(_scalar(inputs, "return_num_output_tokens", False, bool))


class _Metrics:
    """This model's own counters on Triton's /metrics, labelled with model and version."""

    def __init__(self, model, version):
        labels = {"model": model, "version": str(version)}
        self.families = [
            pb_utils.MetricFamily(name="loraship_completion_tokens", description="Tokens generated, cancelled requests included",
                                  kind=pb_utils.MetricFamily.COUNTER),
            pb_utils.MetricFamily(name="loraship_requests_cancelled", description="Requests stopped because the client went away or cancelled",
                                  kind=pb_utils.MetricFamily.COUNTER),
        ]
        self.tokens, self.cancelled = (family.Metric(labels=labels) for family in self.families)

    def finished(self, completion_tokens, cancelled):
        self.tokens.increment(completion_tokens)
        if cancelled:
            self.cancelled.increment(1)


class _Reply:
    """The response sender of one request. The scheduler thread only queues events for it;
    the outbox thread builds and sends the responses, so decode steps never wait on IPC."""

    CANCEL_CHECK_EVERY = 16  # tokens between is_cancelled() round trips to the server

    def __init__(self, sender, options, echo, prompt_tokens, outbox, metrics, logprobs, first_prompt_token=None):
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
        self.seq = None

    # -- scheduler thread: cheap, never raises --
    def on_token(self, token_id, delta, logprob):
        self.completion_tokens += 1
        if self.stream:
            self.outbox.put((self, delta, self.completion_tokens, logprob, None, None))

    def on_done(self, completion, error):
        self.outbox.put((self, None, None, None, completion, error))

    # -- outbox thread --
    def deliver(self, delta, count, logprobs, completion, error):
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
            text, logprobs = ("", []) if self.stream else (completion.text, completion.logprobs)
            self._send(self._response(text, completion.completion_tokens, completion.finish_reason, logprobs,
                                      completion.prompt_logprobs), FINAL)

    def cancel(self):
        if self.seq is not None:
            self.seq.cancel()

    def _send(self, response, flags=0):
        try:
            self.sender.send(response, flags=flags)
        except Exception:  # noqa: BLE001 - the client went away: drop only this request
            self.cancel()

    def _response(self, text, completion_tokens, finish_reason=None, logprobs=(), prompt_logprobs=None):
        text, self.echo = self.echo + text, ""
        tensors = [
            _tensor("text_output", text.encode("utf-8"), np.object_),
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


def _logprob_entry(lp):
    """A TokenLogprob as the logprobs output's JSON entry."""
    return {"token_id": lp.token, "token": lp.text, "logprob": lp.logprob,
            "top_logprobs": [{"token_id": i, "token": text, "logprob": value} for i, text, value in lp.top]}


def _deliver_forever(outbox):
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
        tokens = {}  # reply -> [joined delta, latest count, logprobs], in order of first arrival
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


def _flush(tokens):
    for reply, (delta, count, logprobs) in tokens.items():
        reply.deliver(delta, count, logprobs, None, None)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))
        provider = params.get("provider", "cpu")
        max_batch = int(params.get("max_batch", "8"))
        # No spinning ONNX Runtime threads: they would starve this stub's response threads.
        load_args = {"provider": provider, "max_batch": max_batch, "spin": False}
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
        self.default_max_tokens = int(params.get("default_max_tokens", "128"))
        self.name = args["model_name"]
        self.metrics = _Metrics(args["model_name"], args["model_version"])
        self.outbox = queue.SimpleQueue()
        self.sender_thread = threading.Thread(target=_deliver_forever, args=(self.outbox,), name="loraship-outbox", daemon=True)
        self.sender_thread.start()
        self.scheduler = self.engine.scheduler()
        self.prep = ThreadPoolExecutor(max_workers=PREP_THREADS, thread_name_prefix="loraship-prep")
        hang_timeout = float(params.get("hang_timeout", DEFAULT_HANG_TIMEOUT))
        self.watchdog = Watchdog(self.scheduler, hang_timeout, _exit_hung) if hang_timeout > 0 else None
        plan = self.engine.kv_plan
        pb_utils.Logger.log_info(
            f"loraship: {args['model_name']} v{args['model_version']} on {self.engine.providers}, "
            f"context {self.engine.max_context}, in-flight batch {self.engine.max_batch}"
            + (f"; {plan.describe()}" if plan else "") + f"; {self.engine.text_bound.describe()}"
            + (f"; hang_timeout {hang_timeout:g} s" if hang_timeout > 0 else "")
        )

    def _prompt(self, inputs):
        """The request's prompt as token ids, and its text where it came as text (to echo it)."""
        given = [name for name in ("text_input", "messages", "input_ids") if inputs.get(name) is not None]
        if len(given) > 1:
            raise RequestError(f"send one of text_input, messages or input_ids, not {' and '.join(given)}")
        if given == ["messages"]:
            return self._chat_prompt(inputs), None
        if given == ["input_ids"]:
            ids = inputs["input_ids"]
            if ids.size == 0:
                raise RequestError("input_ids is empty: send the prompt's token ids")
            return ids.tolist(), None
        text = self._text_prompt(inputs)
        return self.engine.encode(text), text

    def _chat_prompt(self, inputs):
        """Token ids of the ``messages`` input rendered with the model's chat template."""
        values = inputs["messages"]
        if values.size != 1:
            raise RequestError(f"messages must hold one JSON list of {{role, content}} objects, got {values.size} values")
        if self.chat is None:
            raise RequestError("this model has no chat template (its export has no chat_template.jinja and no chat_template "
                               "in tokenizer_config.json): send the prompt as text_input")
        self.engine.text_bound.check(values[0], "messages", scale=JSON_ESCAPE)  # before it is parsed
        text = self.chat.render(parse_messages(_text(values[0], "messages")))
        return self.engine.encode(text, add_special_tokens=False, what="messages")  # as ChatTemplate.encode, bounded

    def _text_prompt(self, inputs):
        values = inputs.get("text_input")
        if values is None or values.size == 0:
            raise RequestError("text_input is required: send the prompt text (or messages, for a chat, or input_ids, its token ids)")
        if values.size != 1:
            raise RequestError(f"text_input must hold one prompt, got {values.size}; send one request per prompt")
        self.engine.text_bound.check(values[0], "text_input")  # before it is decoded
        prompt = _text(values[0], "text_input")
        if not prompt:
            raise RequestError("empty prompt: send a non-empty text_input")
        return prompt

    def execute(self, requests):
        """Hand each request to a preparation thread and return: chat templates, tokenizing and validation
        never hold up this thread, and the tokenizer lets the scheduler thread decode meanwhile."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                unknown = _unknown_parameter(request)
                if unknown is not None:
                    raise RequestError(f"{unknown} is not an input of this model; GET /v2/models/{self.name}/config lists the inputs it takes")
                self.prep.submit(self._admit, _inputs(request), sender)
            except Exception as exc:  # noqa: BLE001 - answer, and keep serving
                _send_error(sender, exc)
        return None

    def _admit(self, inputs, sender):
        """Prepare one request (a preparation thread) and queue it; a bad one is answered with its error."""
        try:
            ids, text = self._prompt(inputs)
            room = self.engine.max_context - len(ids)  # no max_tokens: the default, or the room left if less
            params = _sampling_params(inputs, min(self.default_max_tokens, room) if room > 0 else self.default_max_tokens)
            options = _Options(inputs)
            echo = "" if not options.echo else text if text is not None else self.engine.tokenizer.decode(ids, skip_special_tokens=False)
            first = None
            if params.prompt_logprobs is not None:
                first = {"token_id": ids[0], "token": self.engine.tokenizer.decode(ids[:1], skip_special_tokens=False),
                         "logprob": None, "top_logprobs": None}
            reply = _Reply(sender, options, echo, len(ids), self.outbox, self.metrics, params.logprobs is not None, first)
            reply.seq = self.scheduler.submit(ids, params, reply.on_token, reply.on_done)
        except Exception as exc:  # noqa: BLE001 - answer, and keep serving
            _send_error(sender, exc)

    def finalize(self):
        if self.watchdog is not None:
            self.watchdog.stop()
        self.prep.shutdown(wait=True)  # requests being prepared are queued (or answered) first
        self.scheduler.close()  # ends what is still running; its final responses are queued
        self.outbox.put(None)
        self.sender_thread.join(timeout=30)


def _send_error(sender, exc):
    try:
        sender.send(pb_utils.InferenceResponse(error=_error(exc)), flags=FINAL)
    except Exception:  # noqa: BLE001 - the client went away
        pass


def _exit_hung(message):
    """The watchdog's verdict: log it, then end this stub process; Triton reports the model unhealthy and
    the supervisor (`loraship serve`, the container's start script) restarts it."""
    pb_utils.Logger.log_error(message)
    time.sleep(1)  # the log line travels to the server on another thread
    os._exit(1)
