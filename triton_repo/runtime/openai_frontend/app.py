"""The FastAPI app: thin routers for OpenAI's /v1 (over an :class:`~.engine.LLMEngine`) and Triton's /v2
(passed through), behind the :class:`~.edge.Edge`. Errors use OpenAI's shape on /v1 and Triton's on /v2."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .edge import Edge
from .engine import LLMEngine, TritonLLMEngine
from .errors import ApiError
from .proxy import passthrough
from .schemas import ChatRequest, CompletionRequest
from .streaming import EventStream
from .triton import BodyLimit, Triton

openai_router = APIRouter()
triton_router = APIRouter()


def create_app(triton_url: str, api_key: str | None = None, max_body_bytes: int | None = None) -> FastAPI:
    """The app for the Triton at ``triton_url`` (its key: ``api_key``, which clients must send too).

    ``max_body_bytes``: the largest request body; None sizes it from the served models' context
    (:class:`~.triton.BodyLimit`)."""
    triton = Triton(triton_url, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await triton.client.aclose()

    app = FastAPI(title="loraship OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.triton, app.state.engine, app.state.started = triton, TritonLLMEngine(triton), int(time.time())
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.include_router(openai_router)
    app.include_router(triton_router)
    app.add_middleware(Edge, api_key=api_key, limit=BodyLimit(triton, max_body_bytes))
    return app


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.answer(request.url.path)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body pydantic refused: 400 naming the parameter, in OpenAI's shape."""
    error = exc.errors()[0]
    if error.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {error.get('msg')}").response()
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param + ': ' if param else ''}{error.get('msg', 'invalid request')}", param=param).response()


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
    return await _api_error(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


# -- /v1: OpenAI's API ------------------------------------------------------------------------------

def _engine(request: Request) -> LLMEngine:
    return request.app.state.engine


def _answer(result: dict[str, Any] | EventStream) -> Any:
    """OpenAI's JSON, or server-sent events whose upstreams close once they are sent (or the client left)."""
    if isinstance(result, EventStream):
        return StreamingResponse(result.events, media_type="text/event-stream", background=BackgroundTask(result.close))
    return result


def _model_card(request: Request, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": request.app.state.started, "owned_by": "loraship"}


@openai_router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    names = await _engine(request).models()
    return {"object": "list", "data": [_model_card(request, name) for name in names]}


@openai_router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    if model_id not in await _engine(request).models():
        raise ApiError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
    return _model_card(request, model_id)


@openai_router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request) -> Any:
    return _answer(await _engine(request).chat(req))


@openai_router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Any:
    return _answer(await _engine(request).completion(req))


# -- /v2: Triton's API ------------------------------------------------------------------------------

@triton_router.api_route("/v2/health/live", methods=["GET", "HEAD"])
async def live() -> Response:
    """This process's liveness (200 while it runs): a restart of Triton under it does not end the
    container; readiness (/v2/health/ready, Triton's) tells the load balancer to wait."""
    return Response(status_code=200)


@triton_router.api_route("/v2", methods=["GET", "HEAD"])
@triton_router.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
async def triton_api(request: Request) -> Response:
    """Triton's own API, passed through; generate bodies are checked first."""
    return await passthrough(request, request.app.state.triton)
