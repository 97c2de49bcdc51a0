"""Errors as both APIs answer them: OpenAI's shape on /v1, Triton's on /v2; and what a message may quote."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse

RETRY_AFTER = "5"  # seconds, on every 503: the supervisor restarts a crashed Triton within a few
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape them (\ud800); UTF-8 cannot encode them


class ApiError(Exception):
    """An error answered in OpenAI's shape on /v1 and in Triton's (``{"error": message}``) on /v2; a 503
    carries ``Retry-After``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": RETRY_AFTER} if self.status == 503 else {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    def triton_response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)

    def answer(self, path: str) -> JSONResponse:
        """Triton's shape under /v2, OpenAI's elsewhere."""
        return self.triton_response() if is_v2(path) else self.response()


def is_v2(path: str) -> bool:
    """Whether ``path`` is Triton's API (passed through) rather than OpenAI's."""
    return path == "/v2" or path.startswith("/v2/")


def unavailable(message: str) -> ApiError:
    """A 503 ``server_error``: Triton unreachable, its connection dropped, or the model crashed."""
    return ApiError(503, f"{message}: the server is recovering, retry shortly", "server_error")


def shown(value: Any, limit: int = 60) -> str:
    """A client's value for an error message: JSON with non-ASCII escaped (a lone surrogate cannot be
    encoded), cut to ``limit`` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def surrogate_at(data: Any) -> str | None:
    """Where in decoded JSON a string (or a key) holds a lone surrogate, as OpenAI names a parameter
    (``messages.[0].content``); None if nowhere. Iterative: JSON nests deeper than Python recurses."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if SURROGATE.search(key):
                    return f"{path}.{shown(key)}" if path else shown(key)
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.[{i}]", item) for i, item in enumerate(value))
    return None
