"""The contract (``contract/loraship_contract.py``) is the one definition of what the endpoint's parts agree on:
no library module defines its names or spells its key names again, and config.pbtxt, the model's request
parsing and the frontend's generate bodies are read from it (no Triton needed: the parsing module runs
in-process on the engine, the frontend's translation is pure)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import loraship_contract as contract
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("core", "cli", "export", "engine", "triton_repo", "client", "infra")
NAMES = {name for name in vars(contract) if name.isupper()}  # API_KEY_ENV, MAX_LOGPROBS, INPUTS, ...
SPELLED = {contract.API_KEY_ENV, contract.API_KEY_HEADER, contract.GRPC_API_KEY_HEADER, contract.RESTRICTED_APIS}


def second_definitions(root: Path) -> list[str]:
    """Where a library module under ``root`` assigns one of the contract's names, or spells one of its key
    names as a string of its own."""
    found = []
    for path in sorted(p for folder in LIBRARY for p in (root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            found += [f"{path.relative_to(root)}:{node.lineno} {t.id}" for t in targets if isinstance(t, ast.Name) and t.id in NAMES]
            if isinstance(node, ast.Constant) and node.value in SPELLED:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    return found


def test_no_library_module_defines_the_contract_again():
    """No assignment to one of the contract's names, and no string equal to one of its key names (the
    header, the environment variable, the restricted APIs), anywhere in the library but the contract."""
    assert second_definitions(ROOT) == []
    assert {"API_KEY_ENV", "API_KEY_HEADER", "MAX_LOGPROBS", "INT32_MAX", "RESTRICTED_APIS", "INPUTS", "OUTPUTS"} <= NAMES


def test_the_checker_sees_a_second_definition(tmp_path):
    """Not vacuous: a module that defines MAX_LOGPROBS or spells the header is found."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "m.py").write_text('MAX_LOGPROBS = 20\nHEADERS = {"x-api-key": "k"}\nENV = "LORASHIP_API_KEY"\n')
    assert sorted(second_definitions(tmp_path)) == ["core/m.py:1 MAX_LOGPROBS", "core/m.py:2 'x-api-key'", "core/m.py:3 'LORASHIP_API_KEY'"]


def test_config_pbtxt_declares_the_contracts_inputs_and_outputs():
    from tritonclient.grpc import model_config_pb2 as mc

    from loraship.triton_repo.config import ModelOptions, build_config

    cfg = build_config(ModelOptions(name="m"))
    assert [(i.name, mc.DataType.Name(i.data_type), tuple(i.dims), i.optional) for i in cfg.input] == \
        [(i.name, i.dtype, i.dims, True) for i in contract.INPUTS]
    assert [(o.name, mc.DataType.Name(o.data_type), tuple(o.dims)) for o in cfg.output] == [(o.name, o.dtype, o.dims) for o in contract.OUTPUTS]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert (params["max_batch"], params["default_max_tokens"], params["hang_timeout"]) == ("8", "128", "120")


def test_every_sampling_input_names_a_field_of_the_engines_sampling_params():
    """The contract maps inputs (and vLLM's keys) to SamplingParams fields: each one exists, and its defaults
    are the engine's."""
    from loraship.engine import SamplingParams

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert {i.field for i in contract.INPUTS if i.field} <= fields
    assert set(contract.VLLM_SAMPLING_KEYS) <= fields
    defaults = SamplingParams()  # what a request leaves out, read from the contract
    assert {k: getattr(defaults, k) for k in contract.SAMPLING_DEFAULTS} == contract.SAMPLING_DEFAULTS
    assert set(contract.SAMPLING_DEFAULTS) == fields - {"max_tokens"}
    assert set(contract.sampling_inputs(contract.LORASHIP)) == {
        "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "ignore_eos", "logprobs", "prompt_logprobs"}


@pytest.fixture(scope="module")
def model_inputs(tmp_path_factory):
    """The model's request parsing (model_template/loraship_inputs.py), imported as a model version imports it:
    beside ``loraship_engine`` (here the package itself) and the contract."""
    import loraship.engine

    saved = sys.modules.get("loraship_engine")
    sys.modules["loraship_engine"] = loraship.engine
    path = ROOT / "triton_repo" / "model_template" / "loraship_inputs.py"
    spec = importlib.util.spec_from_file_location("loraship_inputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    if saved is None:
        sys.modules.pop("loraship_engine", None)
    else:
        sys.modules["loraship_engine"] = saved


def test_the_model_parses_every_sampling_input_of_the_contract(model_inputs):
    """Each sampling input of every convention sets its field; stop lists come whole; the same field from two
    conventions is refused in one line; vLLM's JSON keys are the contract's."""
    from loraship.engine import RequestError

    values = {"TYPE_INT32": (np.int32, 3), "TYPE_UINT64": (np.uint64, 7), "TYPE_FP32": (np.float32, 0.5), "TYPE_BOOL": (np.bool_, True)}
    for name, spec in contract.sampling_inputs().items():
        if spec.dtype == "TYPE_STRING":
            inputs = {name: np.array([b"END", "STOP".encode()], dtype=np.object_)}
            assert model_inputs.sampling_params(inputs, 16).stop == ("END", "STOP"), name
            continue
        dtype, value = values[spec.dtype]
        inputs = {name: np.array([value], dtype=dtype), **({"max_tokens": np.array([8], np.int32)} if spec.field == "min_tokens" else {})}
        assert getattr(model_inputs.sampling_params(inputs, 16), spec.field) == pytest.approx(value), name
    with pytest.raises(RequestError, match="random_seed and seed both set seed; send it once"):
        model_inputs.sampling_params({"seed": np.array([1], np.uint64), "random_seed": np.array([2], np.uint64)}, 16)
    vllm = {"max_tokens": 4, "min_tokens": 1, "temperature": 0.5, "top_p": 0.5, "top_k": 2, "seed": 9, "stop": ["x"],
            "ignore_eos": True, "repetition_penalty": 1.1, "presence_penalty": 0.1, "frequency_penalty": 0.2}
    assert set(vllm) == set(contract.VLLM_SAMPLING_KEYS)
    params = model_inputs.sampling_params({"sampling_parameters": np.array([json.dumps(vllm).encode()], dtype=np.object_)}, 16)
    assert {k: getattr(params, k) for k in vllm} == {**vllm, "stop": ("x",)}


def test_the_frontend_sends_only_inputs_of_the_contract():
    """The Triton bodies of OpenAI requests that use every option the frontend translates."""
    from loraship.triton_repo.runtime.openai_frontend.schemas import ChatRequest, CompletionRequest
    from loraship.triton_repo.runtime.openai_frontend.translate import chat_bodies, completion_bodies

    sampling = {"model": "m", "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n"], "n": 2,
                "presence_penalty": 0.5, "frequency_penalty": 0.5}
    chat = ChatRequest(**sampling, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=contract.MAX_LOGPROBS)
    text = CompletionRequest(**sampling, prompt=["a", "b"], echo=True, logprobs=2)
    ids = CompletionRequest(**sampling, prompt=[[1, 2], [3]])
    keys = {key for body in chat_bodies(chat) + completion_bodies(text) + completion_bodies(ids) for key in body}
    assert keys <= {i.name for i in contract.INPUTS}
    assert {"messages", "text_input", "input_ids", "exclude_input_in_output", "prompt_logprobs", "logprobs", "seed"} <= keys
