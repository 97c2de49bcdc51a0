"""config.pbtxt for the generate model, built from Triton's own protobuf."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from loraship_contract import DEFAULT_HANG_TIMEOUT_S, DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, INPUTS, OUTPUTS

from loraship.errors import LorashipError

PROVIDERS = ("cpu", "cuda", "tensorrt")
# What Triton (a URL path segment), every filesystem and Azure Files (which `azure upload` skips dot-names
# on) all accept: ASCII letters, digits, '_' and '-', starting with a letter, digit or '_'.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")
MODEL_NAME_RULE = "use 1-128 ASCII letters, digits, '_' or '-', not starting with '-' or '.'"


def check_model_name(name: str, what: str = "model name") -> str:
    """``name`` if Triton, the filesystem and Azure Files all accept it, else a one-line LorashipError."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise LorashipError(f"{what} {name!r} is not valid", MODEL_NAME_RULE)
    return name


@dataclass(frozen=True)
class ModelOptions:
    """What `loraship repo` puts into config.pbtxt; engine options travel as `parameters`."""

    name: str
    instances: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH  # in-flight decode batch of each instance (engine scheduler)
    provider: str = "cpu"
    fp16: bool = False  # TensorRT EP fp16 kernels
    trt_cache_dir: str | None = None
    trt_profile: str | None = None  # "min:opt:max" context lengths for TensorRT shape profiles
    max_context: int | None = None  # cap below the model's own context
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    threads: int | None = None  # ONNX Runtime intra-op threads per instance
    cuda_graph: bool = False  # replay decode steps as CUDA graphs (CUDA provider, genai export)
    chat_template: bool = False  # the export has a chat template (set by write_version; clients read it)
    context: int | None = None  # tokens served: the export's context capped by max_context (set by write_version; the frontend sizes its body limit from it)
    kv_budget_gb: float | None = None  # KV cache memory per instance (genai export): rows = min(batch, budget / row)
    hang_timeout: float = DEFAULT_HANG_TIMEOUT_S  # seconds with work and no finished decode step before a model process ends itself (0: off)
    keep: int = 2
    extra: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`LorashipError` for options no server could load."""
        check_model_name(self.name)
        if self.provider not in PROVIDERS:
            raise LorashipError(f"unknown provider {self.provider!r}", f"use one of {', '.join(PROVIDERS)}")
        if self.instances < 1 or self.max_batch_size < 1:
            raise LorashipError("--instances and --max-batch-size must be at least 1", "pass a positive number")
        if self.keep < 2:
            raise LorashipError(
                f"--keep {self.keep} would delete the version that may be live while the new one loads",
                "pass --keep 2 or more",
            )
        if (self.fp16 or self.trt_profile or self.trt_cache_dir) and self.provider != "tensorrt":
            raise LorashipError("--fp16, --trt-profile and --trt-cache-dir apply to the TensorRT provider", "add --provider tensorrt")
        if self.cuda_graph and self.provider != "cuda":
            raise LorashipError("--cuda-graph applies to the CUDA provider", "add --provider cuda")
        if self.trt_profile is not None:
            parse_trt_profile(self.trt_profile)
        if self.max_context is not None and self.max_context < 2:
            raise LorashipError(f"--max-context {self.max_context} is too small", "pass at least 2 tokens")
        if not 0 <= self.hang_timeout < float("inf"):
            raise LorashipError(f"--hang-timeout {self.hang_timeout} is not a number of seconds", "pass seconds, e.g. 120 (0 turns the watchdog off)")
        if self.kv_budget_gb is not None and not self.kv_budget_gb > 0:
            raise LorashipError(f"--kv-budget-gb {self.kv_budget_gb} is not positive", "pass the GiB of KV cache per instance, e.g. 20")


def parse_trt_profile(text: str) -> tuple[int, int, int]:
    """``"min:opt:max"`` context lengths, ``min <= opt <= max``."""
    try:
        lo, opt, hi = (int(p) for p in text.split(":"))
    except ValueError:
        raise LorashipError(f"--trt-profile {text!r} is not min:opt:max", "pass three token counts, e.g. 1:256:4096") from None
    if not 1 <= lo <= opt <= hi:
        raise LorashipError(f"--trt-profile {text!r} needs 1 <= min <= opt <= max", "e.g. 1:256:4096")
    return lo, opt, hi


def engine_parameters(opts: ModelOptions) -> dict[str, str]:
    """The string parameters model.py reads to load the engine."""
    params = {
        "provider": opts.provider,
        "max_batch": str(opts.max_batch_size),
        "default_max_tokens": str(opts.default_max_tokens),
        "onnx_dir": "onnx",
        "trt_fp16": "1" if opts.fp16 else "0",
    }
    if opts.trt_cache_dir:
        params["trt_cache_dir"] = opts.trt_cache_dir
    if opts.trt_profile:
        params["trt_profile"] = opts.trt_profile
    if opts.max_context:
        params["max_context"] = str(opts.max_context)
    if opts.threads:
        params["threads"] = str(opts.threads)
    if opts.cuda_graph:
        params["cuda_graph"] = "1"
    params["chat_template"] = "1" if opts.chat_template else "0"
    if opts.context:
        params["context"] = str(opts.context)
    params["hang_timeout"] = f"{opts.hang_timeout:g}"
    if opts.kv_budget_gb:
        params["kv_budget_gb"] = repr(opts.kv_budget_gb)
    params.update(opts.extra)
    return params


def build_config(opts: ModelOptions):
    """A ``ModelConfig`` protobuf: python backend, decoupled, one request per call, the inputs and outputs
    of ``loraship_contract`` (every input optional).

    Triton's own batcher stays off (``max_batch_size: 0``): batching happens inside each
    instance, where the engine's scheduler joins new requests between decode steps.
    """
    from tritonclient.grpc import model_config_pb2 as mc

    opts.validate()
    cfg = mc.ModelConfig(name=opts.name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    cfg.version_policy.latest.num_versions = 1
    for spec in INPUTS:
        cfg.input.add(name=spec.name, data_type=mc.DataType.Value(spec.dtype), dims=spec.dims, optional=True)
    for spec in OUTPUTS:
        cfg.output.add(name=spec.name, data_type=mc.DataType.Value(spec.dtype), dims=spec.dims)
    kind = mc.ModelInstanceGroup.KIND_CPU if opts.provider == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.add(count=opts.instances, kind=kind)
    for key, value in sorted(engine_parameters(opts).items()):
        cfg.parameters[key].string_value = value
    return cfg


def render(cfg) -> str:
    """The protobuf text format Triton reads."""
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def read_config(path: Path):
    """Parse an existing config.pbtxt."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise LorashipError(f"{path} is not a valid config.pbtxt: {exc}", "fix or remove it") from None
