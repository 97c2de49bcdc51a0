"""A real local tritonserver: the binary from the nvidia-pytriton wheel, or one on PATH.

``TritonServer`` is what `loraship serve`, `loraship demo`, the tests and the benchmarks
share: it prepares the environment (PATH, LD_LIBRARY_PATH, the python-backend stub for
this interpreter), starts the server on loopback, waits for ``/v2/health/ready`` and on
stop shuts it down and removes the ``/dev/shm`` regions its python stubs created.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraship.endpoint import API_KEY_HEADER, GRPC_API_KEY_HEADER, RESTRICTED_APIS, sample_curl
from loraship.errors import LorashipError
from loraship.triton_repo.layout import model_names

SHM_DIR = Path("/dev/shm")
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


def http_ready(base_url: str) -> bool:
    """Whether Triton's readiness (``/v2/health/ready``, directly or through the frontend) answers 200."""
    try:
        with urllib.request.urlopen(f"{base_url}/v2/health/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


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
        self.http_port = http_port or free_port(host)
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
        self.process: subprocess.Popen | None = None
        self.installation = find_tritonserver()

    @property
    def http_url(self) -> str:
        return f"http://{client_host(self.host)}:{self.http_port}"

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
            f"--http-address={self.host}", f"--http-port={self.http_port}",
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
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def loaded_models(self) -> list[str]:
        """What each loaded model instance logged about itself (providers, context, batch, KV plan)."""
        return re.findall(r'\] "?loraship: (.*?)"?$', self.log_text(), flags=re.MULTILINE)

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; remove this server's shm regions. Returns how many were left."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            self._reap_group(proc.pid)
        return self.remove_shm_regions()

    def _reap_group(self, pgid: int, timeout: float = 10.0) -> None:
        """Wait for the python stubs (same process group) to exit; kill them if they hang."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def shm_regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def remove_shm_regions(self) -> int:
        regions = self.shm_regions()
        for region in regions:
            region.unlink(missing_ok=True)
        return len(regions)

    def wait(self) -> int:
        """Block until the server exits on its own; its exit code."""
        if self.process is None:
            return 0
        return self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeOptions:
    """How `loraship serve` and `loraship ship --target local` run tritonserver: one field per command-line option."""

    host: str = "127.0.0.1"
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    api_key: str | None = None
    model_control_mode: str = "none"
    ready_timeout: float = 300.0
    openai_port: int | None = None  # also the OpenAI-compatible frontend (triton_repo/frontend.py) on this port

    def __post_init__(self) -> None:
        if self.host not in LOOPBACK and not self.api_key:
            raise LorashipError(f"--host {self.host} exposes the server beyond this machine without an API key",
                                "pass --api-key (or set LORASHIP_API_KEY)")

    def server(self, repo: str | Path) -> TritonServer:
        """A (not yet started) server for ``repo``."""
        return TritonServer(repo, host=self.host, http_port=self.http_port, grpc_port=self.grpc_port,
                            metrics_port=self.metrics_port, api_key=self.api_key,
                            model_control_mode=self.model_control_mode, ready_timeout=self.ready_timeout)


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C and SIGTERM stop the server (also when started with SIGINT ignored, e.g. by `&`)."""
    raise KeyboardInterrupt


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve_foreground(server: TritonServer, say: Callable[[str], None] = print, note: Callable[[str], None] = _stderr,
                     on_ready: Callable[[TritonServer], None] | None = None, debug: bool = False,
                     openai_port: int | None = None) -> None:
    """Start ``server`` (and the OpenAI frontend on ``openai_port``), print the endpoints and a sample `curl`,
    run ``on_ready``, then serve until Ctrl-C or SIGTERM (or until the frontend dies); always stop both, the
    python stubs and their shared memory. ``say`` prints to stdout, ``note`` to stderr."""
    if debug:
        note(f"$ {server.masked_command()}")
    frontend = None
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        say(f"HTTP    {server.http_url}  (POST /v2/models/<name>/generate, /generate_stream)")
        say(f"gRPC    {server.grpc_url}")
        say(f"metrics {server.metrics_url}")
        for line in server.loaded_models():
            say(f"model   {line}")
        if openai_port:
            from loraship.triton_repo.frontend import OpenAIFrontend

            frontend = OpenAIFrontend(server.http_url, host=server.host, port=openai_port, api_key=server.api_key).start()
            say(f"OpenAI  {frontend.url}  (GET /models, POST /chat/completions, /completions; Triton's /v2 too)")
        if server.api_key:
            say(f"API key required: header {API_KEY_HEADER} (gRPC metadata {GRPC_API_KEY_HEADER}), here $LORASHIP_API_KEY"
                + ("; OpenAI API: Authorization: Bearer KEY" if frontend else ""))
        say(f"log     {server.log_path}" + (f"  (OpenAI: {frontend.log_path})" if frontend else ""))
        for name in model_names(server.repo):
            say(f"try     {sample_curl(server.http_url, name, API_KEY_HEADER if server.api_key else None)}")
        if on_ready is not None:
            on_ready(server)
        say("Ctrl-C to stop.")
        code = _wait(server, frontend)
        if code:
            raise server.failure(f"tritonserver exited with code {code}")
    except KeyboardInterrupt:
        note("stopping tritonserver ...")
    finally:
        if frontend is not None:
            frontend.stop()
        left = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        note(f"removed {left} shared-memory region(s) left by the python stubs")
    note("stopped.")


def _wait(server: TritonServer, frontend: object | None) -> int:
    """Block until tritonserver exits (its exit code), or fail when the OpenAI frontend dies first."""
    if frontend is None:
        return server.wait()
    while (code := server.process.poll()) is None:
        if frontend.process is None or frontend.process.poll() is not None:
            raise LorashipError("the OpenAI frontend exited while Triton kept running", f"see {frontend.log_path}")
        time.sleep(0.5)
    return code
