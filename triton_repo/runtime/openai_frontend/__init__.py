"""An OpenAI-compatible API in front of a Triton generate model, and Triton's own HTTP API beside it.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions`` and
``POST /v1/chat/completions``, streamed (server-sent events ending in ``data: [DONE]``) or not;
``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's). The model id is the Triton
model name, or the name of an adapter one of the models serves (``adapters``). Everything under ``/v2`` is passed through to Triton, so one port
serves both APIs (on Azure Container Apps it is the public ingress port); ``/v2/health/live`` is this
process's own liveness, ``/v2/health/ready`` Triton's readiness (503 while Triton is unreachable).

Server faults reach clients as server faults: Triton unreachable, a dropped upstream connection or a
crashed model (``Stub process ... is not healthy``) are 503 with ``Retry-After`` (``/v1``: OpenAI's
shape, type ``server_error``), and a stream whose upstream dies ends with an error event.

The modules, in the order a request meets them:

- ``edge``: the key, content types and the body limit, before any work (ASGI middleware);
- ``app``: ``create_app`` and its thin routers; ``engine``: what the /v1 routers need (``LLMEngine``)
  and its implementation over Triton; ``adapters``: which name is a base model and which an adapter
  (the models' own answers), and hot-load through the repository (``loraship_runtime.adapter_store``);
- ``schemas`` (OpenAI's request bodies), ``translate`` (OpenAI <-> Triton generate), ``streaming`` (SSE);
- ``proxy`` (/v2 passed through) with ``generate_checks`` (the /v2 generate bodies Triton would answer 500);
- ``triton`` (Triton's HTTP API: httpx, each model's config cached, the body limit), ``events``,
  ``errors``.

It imports no loraship module (FastAPI, pydantic, httpx, uvicorn and the stdlib, and the zero-import
``loraship_contract``), so `loraship repo --stage-wheels` copies it into the container inside
``loraship_runtime``, where the supervisor runs it (``__main__``):

    LORASHIP_API_KEY=... python -m loraship_runtime.openai_frontend --port 9000 --triton http://127.0.0.1:8000 \\
        --model-repository /mnt/models/repo
"""
