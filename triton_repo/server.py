"""The lifecycle of a local tritonserver (:class:`TritonServer`), the binary ``install`` finds.

``TritonServer`` is what `loraship serve` (triton_repo/serve.py), `loraship demo`, the tests and
the benchmarks share: it starts the server on loopback in the environment ``install`` prepares, with
the API key when given, waits for ``/v2/health/ready``, names the cause of a failed start in one line,
and on stop shuts down its process group and removes the ``/dev/shm`` regions its python stubs created.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from loraship_contract import API_KEY_HEADER, RESTRICTED_APIS

from loraship.errors import LorashipError
from loraship.triton_repo.install import find_tritonserver, server_env
from loraship.triton_repo.layout import model_names
from loraship.triton_repo.localhost import client_host, free_port, temp_log
from loraship.triton_repo.runtime.processes import http_ready, remove_shm, shm_regions, stop_process_group

#: Seconds a local tritonserver may take to become ready: `loraship serve --ready-timeout`'s default, and
#: every other start's (demo, ship --target local, the tests). A mid-size model on CPU, or a TensorRT
#: engine built at load, takes minutes; the wait ends at once when tritonserver exits, so a long timeout
#: costs time only when a server hangs while loading. (The container waits CONTAINER_READY_TIMEOUT_S.)
READY_TIMEOUT_S = 300.0

# Where Triton's log names what went wrong: a model's own load error, a folder that is no model.
LOAD_FAILED = re.compile(r"failed to load '(?P<model>[^']+)' version (?P<version>\d+): "
                         r"(?:(?:Internal|Invalid argument|Not found|Unavailable|Unknown|Unsupported): )?(?P<error>.*?)(?:\\n|\"?$)")
POLL_FAILED = re.compile(r"Poll failed for model directory '(?P<model>[^']+)': (?P<error>.*?)\"?$")
LOG_NOISE = ("CudaDriverHelper", "NVML", "DCGM", "GPU metrics", "pinned memory")


def restricted_api_args(api_key: str, header: str = API_KEY_HEADER) -> list[str]:
    """Triton 2.51 options that refuse HTTP and gRPC calls lacking ``header: api_key``."""
    if not api_key or any(c in api_key for c in " ,:=\n\"'"):
        raise LorashipError(
            "the API key is empty or contains spaces, quotes, ',', ':' or '='",
            "use a random token, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
        )
    return [
        f"--http-restricted-api={RESTRICTED_APIS}:{header}={api_key}",
        f"--grpc-restricted-protocol={RESTRICTED_APIS}:{header}={api_key}",
    ]


def mask_secret(args: Sequence[str], secret: str | None) -> list[str]:
    """``args`` with ``secret`` replaced by ``***``, for printing."""
    return [a.replace(secret, "***") for a in args] if secret else list(args)


def startup_error(log: str) -> str | None:
    """The cause of a failed start in a tritonserver log, on one line: a model's load error, a folder
    that is no model, or the last error Triton logged (CUDA/NVML noise of a CPU-only host skipped)."""
    for line in log.splitlines():
        if m := LOAD_FAILED.search(line):
            return f"model {m['model']} version {m['version']} failed to load: {m['error']}"
    for line in log.splitlines():
        if m := POLL_FAILED.search(line):
            return f"{m['model']} in the repository is not a model: {m['error']}"
    errors = [line for line in log.splitlines()
              if (line.startswith("E") and '] "' in line or line.startswith("error:")) and not any(n in line for n in LOG_NOISE)]
    if not errors:
        return None
    last = errors[-1]
    return (last.split('] "', 1)[1].rstrip('"') if '] "' in last else last.removeprefix("error: ")).split("\\n")[0]


class TritonServer:
    """A tritonserver process on loopback; use as a context manager.

    >>> with TritonServer("work/repo") as server:
    ...     print(server.http_url, server.grpc_url, server.metrics_url)
    """

    def __init__(
        self,
        repo: str | Path,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        api_key: str | None = None,
        model_control_mode: str = "none",
        poll_secs: int = 2,
        load_models: Sequence[str] = (),
        log_path: str | Path | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        extra_args: Sequence[str] = (),
        http_host: str | None = None,
    ) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise LorashipError(f"model repository {repo} does not exist", "create it with `loraship repo`")
        if model_control_mode not in ("none", "poll", "explicit"):
            raise LorashipError(f"unknown model control mode {model_control_mode!r}", "use none, poll or explicit")
        if model_control_mode == "none" and not model_names(self.repo):
            raise LorashipError(f"{repo} is not a Triton model repository: no folder in it holds a config.pbtxt",
                                "pass --repo the folder `loraship repo --out` wrote")
        self.host = host
        self.http_host = http_host or host  # `loraship serve`: 127.0.0.1, behind the frontend
        self.http_port = http_port or free_port(self.http_host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.api_key = api_key
        self.model_control_mode = model_control_mode
        self.poll_secs = poll_secs
        self.load_models = list(load_models)
        self.ready_timeout = ready_timeout
        self.extra_args = list(extra_args)
        self.shm_prefix = f"loraship_{uuid.uuid4().hex[:12]}_"
        self.log_path = Path(log_path) if log_path else temp_log("tritonserver-")
        self.log_offset = 0  # where this run's lines start in the log (a restart appends)
        self.process: subprocess.Popen | None = None
        self.installation = find_tritonserver()

    @property
    def http_url(self) -> str:
        return f"http://{client_host(self.http_host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{client_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{client_host(self.host)}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        """The full tritonserver command line (holds the API key; print ``masked_command``)."""
        inst = self.installation
        args = [str(inst.binary), f"--model-repository={self.repo}"]
        if inst.backend_dir:
            args.append(f"--backend-directory={inst.backend_dir}")
        if inst.cache_dir:
            args.append(f"--cache-directory={inst.cache_dir}")
        args += [
            f"--http-address={self.http_host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-sagemaker=false", "--allow-vertex-ai=false",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--model-control-mode={self.model_control_mode}",
            "--log-info=true",
        ]
        if self.model_control_mode == "poll":
            args.append(f"--repository-poll-secs={self.poll_secs}")
        args += [f"--load-model={m}" for m in self.load_models]
        if self.api_key:
            args += restricted_api_args(self.api_key)
        return args + self.extra_args

    def masked_command(self) -> str:
        return " ".join(mask_secret(self.command(), self.api_key))

    def start(self) -> "TritonServer":
        """Start the server and wait until ``/v2/health/ready`` answers 200."""
        if self.process is not None:
            return self
        log = open(self.log_path, "ab")
        self.log_offset = log.tell()
        try:
            self.process = subprocess.Popen(
                self.command(), env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C reaches us, and we stop it cleanly
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.failure(f"tritonserver exited with code {self.process.returncode} during startup")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise self.failure(f"tritonserver was not ready after {self.ready_timeout:.0f} s",
                           "pass a longer --ready-timeout if the model is still loading")

    def failure(self, what: str, fix: str | None = None) -> LorashipError:
        """One line: what happened and the cause Triton logged (a model's own load error first), with the log's path.

        The log's last lines travel as the error's ``detail`` (printed with --debug)."""
        cause = startup_error(self.log_text())
        notes = [what] if cause else []
        notes += [fix] if fix else []
        return LorashipError(cause or what, "; ".join([*notes, f"full log: {self.log_path}"]), detail=self.log_tail())

    def is_ready(self) -> bool:
        return http_ready(self.http_url)

    def log_text(self) -> str:
        """This run's log (since the last start)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def loaded_models(self) -> list[str]:
        """What each loaded model instance logged about itself (providers, context, batch, KV plan)."""
        return re.findall(r'\] "?loraship: (.*?)"?$', self.log_text(), flags=re.MULTILINE)

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL its process group (the python stubs too) after ``timeout``; remove this
        server's shm regions. Returns how many were left."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, timeout)
        return self.remove_shm_regions()

    def shm_regions(self) -> list[Path]:
        return shm_regions(self.shm_prefix)

    def remove_shm_regions(self) -> int:
        return remove_shm(self.shm_prefix)

    def wait(self) -> int:
        """Block until the server exits on its own; its exit code."""
        if self.process is None:
            return 0
        return self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
