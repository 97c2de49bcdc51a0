"""The OpenAI-compatible frontend (``runtime/openai_frontend``) as a process in front of a running Triton.

`loraship serve` (on its public HTTP port) and the tests start it the way the container's supervisor
does: the same command line (:func:`~loraship.triton_repo.runtime.supervisor.frontend_command`), with the
key in ``LORASHIP_API_KEY`` (never on the command line).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from loraship_contract import API_KEY_ENV

from loraship.errors import LorashipError
from loraship.triton_repo.localhost import client_host, free_port, temp_log
from loraship.triton_repo.runtime.processes import http_ready, stop_process_group
from loraship.triton_repo.runtime.supervisor import frontend_command

#: Seconds the frontend may take to answer Triton's readiness through it (Triton is ready before it starts).
FRONTEND_READY_TIMEOUT_S = 60.0


class OpenAIFrontend:
    """``python -m ...runtime.openai_frontend`` on ``host:port``, passing ``/v2`` to ``triton_url``; a context manager.

    >>> with TritonServer("work/repo") as triton, OpenAIFrontend(triton.http_url) as api:
    ...     print(api.url)  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, triton_url: str, host: str = "127.0.0.1", port: int | None = None, api_key: str | None = None,
                 log_path: str | Path | None = None, ready_timeout: float = FRONTEND_READY_TIMEOUT_S,
                 repository: str | Path | None = None) -> None:
        self.triton_url = triton_url
        self.repository = repository  # Triton's model repository: where /v1/load_lora_adapter installs adapters
        self.host = host
        self.port = port or free_port(host)
        self.api_key = api_key
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else temp_log("loraship-openai-")
        self.process: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        """``http://HOST:PORT``: /v1 (OpenAI) and /v2 (Triton) live under it."""
        return f"http://{client_host(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL (``base_url`` of the openai SDK)."""
        return f"{self.root}/v1"

    def command(self) -> list[str]:
        return frontend_command(self.host, self.port, self.triton_url, str(self.repository) if self.repository else None)

    def start(self) -> "OpenAIFrontend":
        """Start the frontend and wait until Triton's readiness answers 200 through it."""
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        if self.api_key:
            env[API_KEY_ENV] = self.api_key
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while not self.is_ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log_path.read_text(errors="replace").splitlines()
                cause = next((line.strip() for line in reversed(log) if "error" in line.lower()), None)
                raise LorashipError(f"the OpenAI frontend on port {self.port} did not come up" + (f": {cause}" if cause else ""),
                                    f"see {self.log_path}", detail="\n".join(log[-15:]))
            time.sleep(0.2)
        return self

    def is_ready(self) -> bool:
        return http_ready(self.root)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (uvicorn drains open streams for at most 5 s), then SIGKILL."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, timeout)

    def __enter__(self) -> "OpenAIFrontend":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
