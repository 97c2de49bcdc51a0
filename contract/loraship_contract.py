"""What every part of a loraship endpoint agrees on, defined once: the API key's names, the limits,
and the generate model's inputs, outputs and parameter defaults.

It imports nothing, so every part that runs apart from loraship carries this same file:

- `loraship repo` copies it beside ``model.py`` into each model version, where the model, its request
  parsing (``loraship_inputs.py``) and its ``loraship_engine`` import it;
- `loraship repo --stage-wheels` copies it beside ``loraship_runtime`` (the supervisor and the OpenAI
  frontend) into ``wheels/``;
- loraship imports it as the top-level module ``loraship_contract`` (pyproject maps it from ``contract/``).

No other module defines these names (``tests/test_contract.py`` checks it).
"""

# -- the API key -------------------------------------------------------------------------------------

#: Where the key comes from: the CLI's environment, the container's secret (never a command line).
API_KEY_ENV = "LORASHIP_API_KEY"
#: The header Triton checks (``--http-restricted-api``); the frontend also takes ``Authorization: Bearer``.
API_KEY_HEADER = "x-api-key"
#: Triton 2.51 expects restricted gRPC metadata under a prefixed key.
GRPC_API_KEY_HEADER = f"triton-grpc-protocol-{API_KEY_HEADER}"
#: Everything but health, so probes keep working while inference and model control need the key.
RESTRICTED_APIS = "metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"

# -- limits ------------------------------------------------------------------------------------------

#: The most likely tokens listed per position (logprobs, prompt_logprobs; OpenAI's top_logprobs allows 20).
MAX_LOGPROBS = 20
#: What Triton's INT32 inputs hold (max_tokens, top_k, token ids); its JSON parser wraps larger integers.
INT32_MAX = 2**31 - 1

# -- adapters (issue 19): a model's LoRA adapters, kept with the model repository -------------------

#: ``<repo>/<model>/multi_lora.json`` (as Triton's vLLM backend names it): adapter name -> converted folder,
#: relative to the model folder. Every instance of the model re-reads it when it changes.
REGISTRY_FILE = "multi_lora.json"
#: ``<repo>/<model>/adapters/<name>/``: the converted adapters installed in a repository.
ADAPTERS_DIR = "adapters"
#: What an adapter may be named (OpenAI model ids and Hugging Face repo names fit).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$"
#: How a request names its adapter (Triton's vLLM backend): a key of ``sampling_parameters``, or a request parameter.
LORA_NAME = "lora_name"
#: A request parameter: ``{"loraship_adapters": true}`` asks the model which adapters it serves; it answers at once,
#: off its decode loop, with one response whose text_output is JSON (``{"slots": N, "adapters": [...], "failed": {...}}``).
ADAPTERS_QUERY = "loraship_adapters"

# -- the generate model's config.pbtxt parameters: defaults for a config that leaves them out ----------

DEFAULT_MAX_BATCH = 8  # in-flight decode batch of each instance (the engine's scheduler)
DEFAULT_MAX_TOKENS = 128  # a request without max_tokens (or less: the room its context has left)
DEFAULT_HANG_TIMEOUT_S = 120.0  # work and no finished decode step for this long: the model process ends itself

# -- the generate model's inputs and outputs ---------------------------------------------------------

#: Whose names an input follows. One model takes all three:
#: loraship's own (Triton's generate extension); TensorRT-LLM's ensemble (genai-perf --backend tensorrtllm,
#: Triton's OpenAI frontend); vLLM's backend (genai-perf --backend vllm).
LORASHIP, TENSORRT_LLM, VLLM = "loraship", "tensorrt_llm", "vllm"


class Input:
    """One input of the generate model; every input is optional. With ``max_batch_size: 0`` clients send
    a value as shape ``[1]`` and a list as ``[n]`` (dims ``-1``).

    ``field`` is the engine's ``SamplingParams`` field a sampling input sets (None: a prompt or an option);
    ``convention`` whose name it is (:data:`LORASHIP`, :data:`TENSORRT_LLM` or :data:`VLLM`)."""

    __slots__ = ("name", "dtype", "dims", "field", "convention")

    def __init__(self, name: str, dtype: str, dims: tuple[int, ...] = (1,), field: str | None = None,
                 convention: str = LORASHIP) -> None:
        self.name, self.dtype, self.dims, self.field, self.convention = name, dtype, dims, field, convention

    def __repr__(self) -> str:
        return f"Input({self.name!r}, {self.dtype!r}, {self.dims!r}, field={self.field!r}, convention={self.convention!r})"


class Output:
    """One output of the generate model."""

    __slots__ = ("name", "dtype", "dims")

    def __init__(self, name: str, dtype: str, dims: tuple[int, ...] = (1,)) -> None:
        self.name, self.dtype, self.dims = name, dtype, dims

    def __repr__(self) -> str:
        return f"Output({self.name!r}, {self.dtype!r}, {self.dims!r})"


#: The prompt is one of these: text, a chat (a JSON list of {role, content} rendered with the export's chat
#: template and the generation prompt), or token ids.
PROMPT_INPUTS = ("text_input", "messages", "input_ids")

#: In config.pbtxt's order.
INPUTS = (
    Input("text_input", "TYPE_STRING"),
    Input("messages", "TYPE_STRING"),
    Input("input_ids", "TYPE_INT32", (-1,)),
    Input("max_tokens", "TYPE_INT32", field="max_tokens"),
    Input("stream", "TYPE_BOOL"),  # one response per token, then a final one; false: exactly one response
    Input("temperature", "TYPE_FP32", field="temperature"),
    Input("top_p", "TYPE_FP32", field="top_p"),
    Input("top_k", "TYPE_INT32", field="top_k"),
    Input("seed", "TYPE_UINT64", field="seed"),
    Input("stop", "TYPE_STRING", (-1,), field="stop"),
    Input("repetition_penalty", "TYPE_FP32", field="repetition_penalty"),
    Input("presence_penalty", "TYPE_FP32", field="presence_penalty"),
    Input("frequency_penalty", "TYPE_FP32", field="frequency_penalty"),
    Input("ignore_eos", "TYPE_BOOL", field="ignore_eos"),
    Input("logprobs", "TYPE_INT32", field="logprobs"),  # k: each generated token's log-probability and the k most likely
    Input("prompt_logprobs", "TYPE_INT32", field="prompt_logprobs"),  # k: the same for each prompt token after the first
    Input("exclude_input_in_output", "TYPE_BOOL", convention=TENSORRT_LLM),  # false: the prompt before the text
    Input("random_seed", "TYPE_UINT64", field="seed", convention=TENSORRT_LLM),
    Input("stop_words", "TYPE_STRING", (-1,), field="stop", convention=TENSORRT_LLM),
    Input("min_length", "TYPE_INT32", field="min_tokens", convention=TENSORRT_LLM),
    Input("sampling_parameters", "TYPE_STRING", convention=VLLM),  # a JSON object: VLLM_SAMPLING_KEYS
    Input("return_num_input_tokens", "TYPE_BOOL", convention=VLLM),
    Input("return_num_output_tokens", "TYPE_BOOL", convention=VLLM),
)

#: num_input_tokens / num_output_tokens (vLLM's names and types), logprobs (a JSON list with an entry per
#: token of that response) and prompt_logprobs (in the last response: an entry per prompt token, null for
#: the first) only when the request asks for them; num_output_tokens counts the tokens of that one response.
OUTPUTS = (
    Output("text_output", "TYPE_STRING"),
    Output("prompt_tokens", "TYPE_INT32"),
    Output("completion_tokens", "TYPE_INT32"),
    Output("finish_reason", "TYPE_STRING"),
    Output("num_input_tokens", "TYPE_UINT32"),
    Output("num_output_tokens", "TYPE_UINT32"),
    Output("logprobs", "TYPE_STRING"),
    Output("prompt_logprobs", "TYPE_STRING"),
)

#: What the model does with a sampling value a request leaves out: the engine's ``SamplingParams`` defaults (which
#: are these), by field. ``max_tokens`` is the repository's instead (DEFAULT_MAX_TOKENS, or `repo --max-tokens`).
SAMPLING_DEFAULTS = {
    "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": (), "repetition_penalty": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0, "ignore_eos": False, "logprobs": None,
    "prompt_logprobs": None,
}

#: vLLM's ``sampling_parameters`` keys the model takes (each the SamplingParams field of that name) -> the
#: kind of value: "int", "uint64", "float", "bool" or "strings" (a string or a list of them).
VLLM_SAMPLING_KEYS = {
    "max_tokens": "int", "min_tokens": "int", "temperature": "float", "top_p": "float", "top_k": "int",
    "seed": "uint64", "stop": "strings", "ignore_eos": "bool", "repetition_penalty": "float",
    "presence_penalty": "float", "frequency_penalty": "float",
}
#: Keys taken only at the values that ask for nothing: Triton's OpenAI frontend (--backend vllm) sends every
#: OpenAI field that has a default, so n, best_of, logprobs and logit_bias come with each request.
VLLM_NEUTRAL_KEYS = {"n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},)}


def sampling_inputs(*conventions: str) -> dict[str, Input]:
    """The inputs that set a ``SamplingParams`` field, by name; only those of ``conventions`` when given."""
    return {i.name: i for i in INPUTS if i.field is not None and (not conventions or i.convention in conventions)}
