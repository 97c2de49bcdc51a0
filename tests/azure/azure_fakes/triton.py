"""A fake of the app's public ingress, for deploy's readiness wait and its two smoke requests.

Stands in for Azure Container Apps' HTTPS ingress and, behind it, loraship's frontend on the
public port: Triton's API under /v2 (health open; model metadata and the generate extension
require the API key header, as `--http-restricted-api` makes Triton do) and the OpenAI API
under /v1 (``Authorization: Bearer KEY``, 401 and 404 in OpenAI's error shape), as
``triton_repo/runtime/openai_frontend`` answers them.
"""

from __future__ import annotations

import json
import re

from .server import HttpsServer, Request, Response

INPUTS = [("text_input", "BYTES"), ("max_tokens", "INT32"), ("stream", "BOOL")]


class FakeTriton:
    def __init__(self, ca, model: str, api_key: str | None = None, header: str = "x-api-key") -> None:
        self.model, self.api_key, self.header = model, api_key, header
        self.requests: list[Request] = []
        self.server = HttpsServer(ca, self.handle)
        self.fqdn = f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.close()

    def handle(self, req: Request) -> Response:
        self.requests.append(req)
        if req.path.startswith("/v1/"):
            return self.openai(req)
        if req.path in ("/v2/health/ready", "/v2/health/live"):
            return Response(200)
        if req.headers.get(self.header) != self.api_key:
            return self._json(403, {"error": f"This API is restricted, expecting header '{self.header}'"})
        m = re.match(r"^/v2/models/([^/]+)(/generate)?$", req.path)
        if not m or m[1] != self.model:
            return self._json(400, {"error": f"Request for unknown model: '{m[1] if m else req.path}'"})
        if m[2]:
            body = json.loads(req.body)
            return self._json(200, {"model_name": self.model, "model_version": "1", "text_output": f"echo {body['text_input']}", "prompt_tokens": 1, "completion_tokens": body["max_tokens"], "finish_reason": "length"})
        return self._json(200, {"name": self.model, "versions": ["1"], "platform": "python",
                                "inputs": [{"name": n, "datatype": d, "shape": [1]} for n, d in INPUTS],
                                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]})

    def openai(self, req: Request) -> Response:
        def error(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
            return self._json(status, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})

        if req.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "Incorrect API key provided", code="invalid_api_key")
        body = json.loads(req.body)
        if body.get("model") != self.model:
            return error(404, f"The model `{body.get('model')}` does not exist", "model", "model_not_found")
        usage = {"prompt_tokens": 1, "completion_tokens": body["max_tokens"], "total_tokens": 1 + body["max_tokens"]}
        if req.path == "/v1/chat/completions":
            message = {"role": "assistant", "content": f"echo {body['messages'][-1]['content']}"}
            return self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": self.model, "usage": usage,
                                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}]})
        if req.path == "/v1/completions":
            return self._json(200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": self.model, "usage": usage,
                                    "choices": [{"index": 0, "text": f"echo {body['prompt']}", "logprobs": None, "finish_reason": "length"}]})
        return self._json(404, {"detail": "Not Found"})

    @staticmethod
    def _json(status: int, data: dict) -> Response:
        return Response(status, json.dumps(data).encode(), {"Content-Type": "application/json"})
