"""A deterministic word-level "LLM" speaking the serving issue's generate contract.

Used by the client tests only while no exported demo model can be served: it runs
inside the real tritonserver (python backend, decoupled) with the same inputs and
outputs as the real generate model, so the client, bench and UI exercise real
HTTP, SSE and gRPC streaming. Tokens are whitespace words from a fixed vocabulary.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

VOCAB = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
MAX_TOKENS = 256
MAX_CONTEXT = 512


def _opt(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        self.delay_s = float(json.loads(args["model_config"])["parameters"]["token_delay_s"]["string_value"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(request, sender)
            except Exception as exc:  # a bad request answers with an error, the server stays up
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _generate(self, request, sender):
        text_in = pb_utils.get_input_tensor_by_name(request, "text_input")
        if text_in is None:
            raise ValueError("text_input is required")
        prompt = text_in.as_numpy().reshape(-1)[0].decode()
        max_tokens = int(_opt(request, "max_tokens", 16))
        if not 0 < max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be in 1..{MAX_TOKENS}, got {max_tokens}")
        stream = bool(_opt(request, "stream", False))
        temperature = float(_opt(request, "temperature", 0.0))
        seed = int(_opt(request, "seed", 0))
        stop_tensor = pb_utils.get_input_tensor_by_name(request, "stop")
        stops = {s.decode() for s in stop_tensor.as_numpy().reshape(-1)} if stop_tensor is not None else set()
        prompt_tokens = len(prompt.split())
        if prompt_tokens + max_tokens > MAX_CONTEXT:
            raise ValueError(f"prompt of {prompt_tokens} tokens + max_tokens exceeds the context of {MAX_CONTEXT}")
        state = sum(prompt.encode()) + (seed * 7919 if temperature > 0 else 0)
        words, finish = [], "length"
        for i in range(max_tokens):
            time.sleep(self.delay_s)
            state = (state * 1103515245 + 12345) % 2**31
            word = VOCAB[state % len(VOCAB)]
            if word in stops:
                finish = "stop"
                break
            words.append(word)
            if stream:
                delta = ("" if i == 0 else " ") + word
                sender.send(self._response(delta, prompt_tokens, len(words), None))
        text = " ".join(words)
        if stream:
            sender.send(self._response("", prompt_tokens, len(words), finish),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            sender.send(self._response(text, prompt_tokens, len(words), finish),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _response(text, prompt_tokens, completion_tokens, finish):
        outputs = [
            pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int32)),
        ]
        if finish is not None:
            outputs.append(pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)))
        return pb_utils.InferenceResponse(output_tensors=outputs)
