"""A real local tritonserver: the binary from the nvidia-pytriton wheel, or one on PATH.

``TritonServer`` is what `loraship serve` (triton_repo/serve.py), `loraship demo`, the tests and
the benchmarks share: it prepares the environment (PATH, LD_LIBRARY_PATH, the python-backend stub
for this interpreter), starts the server on loopback, waits for ``/v2/health/ready`` and on
stop shuts it down and removes the ``/dev/shm`` regions its python stubs created.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loraship.endpoint import API_KEY_HEADER, RESTRICTED_APIS
from loraship.errors import LorashipError
from loraship.triton_repo.layout import model_names
from loraship.triton_repo.supervisor import http_ready, remove_shm, shm_regions, stop_process_group

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


def temp_log(prefix: str) -> Path:
    """A new, empty log file for a child process (its descriptor closed here; the child appends)."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(fd)
    return Path(path)


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (all addresses: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not listen on ``host:port`` now (bound as servers bind: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class Installation:
    """Where the tritonserver binary and its backends live."""

    binary: Path
    backend_dir: Path | None  # None: the server's own default (an NGC-style install)
    cache_dir: Path | None


def _pytriton_root() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> Installation:
    """The nvidia-pytriton wheel's tritonserver, its python stub set up for this Python, or one on PATH."""
    root = _pytriton_root()
    if root is not None:
        return Installation(root / "bin" / "tritonserver", _python_backend(root), root / "caches")
    on_path = shutil.which("tritonserver")
    if on_path:
        return Installation(Path(on_path), None, None)
    raise LorashipError("no tritonserver found", "pip install nvidia-pytriton, or put a tritonserver on PATH")


def _python_backend(root: Path) -> Path:
    """A backends directory whose python backend has the stub for the running interpreter.

    The stub is copied into the wheel's own ``backends/python`` when that is writable;
    otherwise a private backends directory is assembled under ``~/.cache/loraship``.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LorashipError(f"nvidia-pytriton ships no python-backend stub for Python {version}", "use Python 3.8 to 3.13")
    backends = root / "backends"
    target = backends / "python" / stub.name
    if target.is_file() and filecmp.cmp(stub, target, shallow=False):
        return backends
    if os.access(backends / "python", os.W_OK):
        _copy_atomic(stub, target)
        return backends
    private = Path.home() / ".cache" / "loraship" / "triton-backends" / version
    (private / "python").mkdir(parents=True, exist_ok=True)
    for item in (backends / "python").iterdir():
        if item.is_file() and item.name != stub.name and not (private / "python" / item.name).exists():
            (private / "python" / item.name).symlink_to(item)
    if not (private / "python" / stub.name).is_file():
        _copy_atomic(stub, private / "python" / stub.name)
    return private


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def server_env() -> dict[str, str]:
    """PATH with this venv's bin first (model.py imports its packages) and LD_LIBRARY_PATH = libpython's dir."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


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
        ready_timeout: float = 180.0,
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
