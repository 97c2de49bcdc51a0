"""The FastAPI app: thin routers for OpenAI's /v1 (over an :class:`~.engine.LLMEngine`) and Triton's /v2
(passed through), behind the :class:`~.edge.Edge`. Errors use OpenAI's shape on /v1 and Triton's on /v2."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .adapters import Adapters, Route, not_found
from .edge import Edge
from .engine import LLMEngine, TritonLLMEngine
from .errors import ApiError
from .proxy import passthrough
from .schemas import ChatRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest
from .streaming import EventStream
from .triton import BodyLimit, Triton

openai_router = APIRouter()
triton_router = APIRouter()


def create_app(triton_url: str, api_key: str | None = None, max_body_bytes: int | None = None,
               repository: str | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The app for the Triton at ``triton_url`` (its key: ``api_key``, which clients must send too).

    ``max_body_bytes``: the largest request body; None sizes it from the served models' context
    (:class:`~.triton.BodyLimit`). ``repository``: Triton's model repository, where
    ``/v1/load_lora_adapter`` installs adapters (None: those routes answer 501). ``host``: the address
    this app is served on; without a key, loading adapters is allowed only on a loopback one."""
    triton = Triton(triton_url, api_key)
    adapters = Adapters(triton, repository, api_key, host)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await triton.client.aclose()

    app = FastAPI(title="loraship OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.triton, app.state.engine, app.state.started = triton, TritonLLMEngine(triton, adapters), int(time.time())
    app.state.adapters = adapters
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


def _model_card(request: Request, route: Route) -> dict[str, Any]:
    """vLLM's card: a base model is its own root with no parent; an adapter's parent is its base model."""
    name = route.adapter or route.model
    return {"id": name, "object": "model", "created": request.app.state.started, "owned_by": "loraship",
            "root": name, "parent": route.model if route.adapter else None}


@openai_router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    routes = await _engine(request).models()
    return {"object": "list", "data": [_model_card(request, route) for route in routes]}


@openai_router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    route = next((r for r in await _engine(request).models() if (r.adapter or r.model) == model_id), None)
    if route is None:
        raise not_found(model_id)
    return _model_card(request, route)


@openai_router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadLoraRequest, request: Request) -> PlainTextResponse:
    """vLLM's hot-load: install a converted adapter into the repository; 200 once the model serves it."""
    return PlainTextResponse(await request.app.state.adapters.load(req.lora_name, req.lora_path, req.model))


@openai_router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoraRequest, request: Request) -> PlainTextResponse:
    """vLLM's unload: new requests on the adapter are 404 from the answer on; running ones finish."""
    return PlainTextResponse(await request.app.state.adapters.unload(req.lora_name))


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
