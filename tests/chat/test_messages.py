"""The generate model's ``messages`` input through a real tritonserver: rendered with the export's chat
template inside the model (no transformers there), generated like the in-process engine on those ids."""

from __future__ import annotations

import json

import numpy as np
from testkit import grpc_stream, scalars

from .conftest import API_KEY, CONVERSATION, MAX_TOKENS, MODEL, RAW_MODEL


def test_template_travels_from_export_into_the_triton_version(chat_server, onnx_dir):
    from loraship.triton_repo.config import read_config

    version = chat_server.repo / MODEL / "1" / "onnx"
    assert (version / "chat_template.jinja").read_text() == (onnx_dir / "chat_template.jinja").read_text()
    assert read_config(chat_server.repo / MODEL / "config.pbtxt").parameters["chat_template"].string_value == "1"
    assert read_config(chat_server.repo / RAW_MODEL / "config.pbtxt").parameters["chat_template"].string_value == "0"


def test_http_messages_generate_equals_the_engine_on_the_template_ids(chat_server, chat_ids, greedy):
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        ids = chat_ids(messages)
        expected = greedy(ids)
        status, reply = chat_server.generate(MODEL, {"messages": json.dumps(messages), "max_tokens": MAX_TOKENS})
        assert status == 200, reply
        assert reply["text_output"] == expected.text
        assert reply["prompt_tokens"] == len(ids) and reply["completion_tokens"] == expected.completion_tokens
        assert reply["finish_reason"] == expected.finish_reason


def test_grpc_messages_stream_equals_the_engine(chat_server, chat_ids, greedy):
    expected = greedy(chat_ids(CONVERSATION))
    fields = {"messages": np.array([json.dumps(CONVERSATION).encode()], np.object_),
              "max_tokens": np.array([MAX_TOKENS], np.int32), "stream": np.array([True])}
    responses = grpc_stream(chat_server.triton.grpc_url, MODEL, fields, headers={"triton-grpc-protocol-x-api-key": API_KEY})
    assert not isinstance(responses, str), responses
    text = "".join(r["text_output"].reshape(-1)[0].decode() for r in responses)
    last = scalars(responses[-1])
    assert text == expected.text and last["completion_tokens"] == expected.completion_tokens
    assert last["finish_reason"] == expected.finish_reason


def test_model_without_template_refuses_messages_and_still_serves_text(chat_server, greedy):
    status, reply = chat_server.generate(RAW_MODEL, {"messages": json.dumps(CONVERSATION), "max_tokens": 4})
    assert status == 400 and "this model has no chat template" in reply["error"] and "send the prompt as text_input" in reply["error"]
    status, reply = chat_server.generate(RAW_MODEL, {"text_input": "The quick brown fox", "max_tokens": MAX_TOKENS})
    assert status == 200 and reply["text_output"] == greedy("The quick brown fox").text


def test_bad_messages_are_one_line_errors(chat_server, greedy):
    cases = [
        ({"messages": "not json"}, "messages is not valid JSON"),
        ({"messages": "[]"}, "non-empty JSON list"),
        ({"messages": json.dumps([{"content": "no role"}])}, "messages[0] must be an object with a string role"),
        ({"messages": json.dumps(CONVERSATION), "text_input": "hi"}, "send one of text_input, messages or input_ids, not text_input and messages"),
        ({"max_tokens": 4}, "text_input is required"),
        ({"messages": json.dumps([{"role": "user", "content": "hello " * 3000}])}, "shorten the prompt"),
    ]
    for fields, message in cases:
        status, reply = chat_server.generate(MODEL, {"max_tokens": 4, **fields})
        assert status == 400 and message in reply["error"], (fields, reply)
    status, reply = chat_server.generate(MODEL, {"text_input": "The quick brown fox", "max_tokens": MAX_TOKENS})
    assert status == 200 and reply["text_output"] == greedy("The quick brown fox").text


def test_repo_refuses_an_export_whose_template_does_not_compile(onnx_dir, tmp_path, run_cli):
    import shutil

    broken = tmp_path / "onnx"
    shutil.copytree(onnx_dir, broken)
    (broken / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'] }")
    assert run_cli(["export", "--rehash", str(broken)])[0] == 0  # an edit on purpose: its checksum recorded
    code, out, err = run_cli(["repo", "--onnx", str(broken), "--out", str(tmp_path / "repo"), "--name", "m"])
    assert code == 1 and "chat template does not compile" in err and "fix chat_template.jinja" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "repo").exists()
