"""Chat fixtures: a real tritonserver (nvidia-pytriton's binary, API key on) serving the session's tiny
demo export twice, ``tiny`` with its chat template and ``tiny-raw`` without one, and the OpenAI-compatible
frontend in front of it, started as `loraship serve --openai-port` starts it."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from testkit import metrics_text, post_json

from loraship_contract import API_KEY_HEADER

from loraship.triton_repo.frontend import OpenAIFrontend
from loraship.triton_repo.server import TritonServer

API_KEY = "chat-tests-key-5e1d0a93"
MODEL, RAW_MODEL = "tiny", "tiny-raw"
MAX_TOKENS = 16
CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Write a short poem about the sea."},
]


@dataclass(frozen=True)
class ChatServer:
    triton: TritonServer
    frontend: OpenAIFrontend
    repo: Path

    def openai(self, api_key: str | None = API_KEY, **kw):
        """The official openai client on the frontend."""
        import openai

        return openai.OpenAI(base_url=self.frontend.url, api_key=api_key, max_retries=0, timeout=120, **kw)

    def generate(self, model: str, fields: dict, url: str | None = None) -> tuple[int, dict]:
        """POST Triton's /generate (directly, or through ``url``): (status, reply)."""
        status, body = post_json(f"{url or self.triton.http_url}/v2/models/{model}/generate", fields, {API_KEY_HEADER: API_KEY}, 120)
        return status, json.loads(body)

    def metrics(self) -> str:
        return metrics_text(self.triton.metrics_url)


@pytest.fixture(scope="session")
def raw_onnx_dir(onnx_dir, tmp_path_factory) -> Path:
    """The same export without a chat template."""
    raw = tmp_path_factory.mktemp("raw") / "onnx"
    shutil.copytree(onnx_dir, raw)
    (raw / "chat_template.jinja").unlink()
    config = json.loads((raw / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (raw / "tokenizer_config.json").write_text(json.dumps(config))
    from loraship.export.manifest import rehash

    rehash(raw)  # the export's checksums, as `loraship export --rehash` records them after an edit
    return raw


@pytest.fixture(scope="session")
def chat_server(onnx_dir, raw_onnx_dir, tmp_path_factory):
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version

    repo = tmp_path_factory.mktemp("chat-triton") / "repo"
    write_version(onnx_dir, repo, ModelOptions(name=MODEL, max_batch_size=8, threads=2))
    write_version(raw_onnx_dir, repo, ModelOptions(name=RAW_MODEL, max_batch_size=4, threads=1))
    with TritonServer(repo, api_key=API_KEY, ready_timeout=120) as triton, OpenAIFrontend(triton.http_url, api_key=API_KEY) as frontend:
        yield ChatServer(triton, frontend, repo)


@pytest.fixture(scope="session")
def chat_ids(onnx_dir, engine):
    """Token ids of a conversation rendered with the export's template (the engine's own chat module)."""
    from loraship.engine.chat import ChatTemplate

    template = ChatTemplate.load(onnx_dir)
    return lambda messages: template.encode(messages, engine.tokenizer)


@pytest.fixture(scope="session")
def greedy(engine):
    """In-process greedy completion of a prompt (text or token ids)."""
    from loraship.engine import SamplingParams

    def run(prompt, max_tokens: int = MAX_TOKENS, **params):
        [done] = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, **params))
        return done

    return run
