"""Serve the API with uvicorn: ``python -m <this package> --port 9000 --triton http://127.0.0.1:8000``; the key
comes from the environment (LORASHIP_API_KEY), never the command line."""

from __future__ import annotations

import argparse
import os

from loraship_contract import API_KEY_ENV

from .app import create_app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="openai_frontend", description="An OpenAI-compatible API in front of a Triton "
                                     "generate model, and Triton's own HTTP API beside it.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    parser.add_argument("--triton", default="http://127.0.0.1:8000", help="Triton's HTTP endpoint (default http://127.0.0.1:8000)")
    parser.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                        help="refuse request bodies over N bytes with 413 (default: 1 MiB + 64 bytes per token of the "
                             "served models' largest context)")
    parser.add_argument("--model-repository", default=None, metavar="PATH",
                        help="Triton's model repository: POST /v1/load_lora_adapter installs adapters there (default: none, "
                             "and those routes answer 501)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        parser.error(f"--max-body-bytes {args.max_body_bytes} is not positive: pass a byte count, e.g. 10485760")
    app = create_app(args.triton, os.environ.get(API_KEY_ENV) or None, args.max_body_bytes, args.model_repository, args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
