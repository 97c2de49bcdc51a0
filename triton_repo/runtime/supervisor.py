"""Keep a tritonserver serving: restart it when a python stub dies, when it exits, or when it stops answering.

Triton 2.51 never restarts a decoupled model's python stub: after a stub dies (an OOM kill, a CUDA
fault, the model's own hang watchdog) its in-flight streams hang, every later request fails with
``Stub process '...' is not healthy``, and ``/v2/health/ready`` still answers 200. Reloading the model
leaves the dead instance's requests orphaned. So the supervisor restarts the whole server:

* it watches ``/proc`` for the python stubs of its tritonserver; a stub that disappears (or turns
  zombie) while Triton's repository index still lists its model version READY has died (a version
  that is unloading or swapped out is no longer READY, so legitimate unloads are left alone). It also
  notices tritonserver exiting, and its HTTP liveness failing for ``hang_s`` seconds;
* it then kills tritonserver's process group (after ``grace_s``, 0 by default: with a dead stub Triton
  never finishes a graceful shutdown, and it reports ready while it tries), so every in-flight stream
  (HTTP and gRPC) ends at once with an error, removes its ``/dev/shm`` regions, starts it again on the
  same ports, waits until it is ready (in explicit model-control mode, loads again the models that were
  serving), and says one line;
* it waits longer before each further restart (0, 1, 2, 4 ... 30 s) and gives up (raising
  ``GaveUp``) when more than ``max_restarts`` are needed within ``window_s``;
* a frontend process that exits ends the supervision (``FrontendExited``).

Stdlib only (and the contract): `loraship serve` supervises its TritonServer and OpenAIFrontend with
:class:`Supervisor`, and `loraship repo --stage-wheels` copies this package into the container as
``loraship_runtime``, where ``start.sh`` runs it as the parent of tritonserver and the frontend:

    python3 -m loraship_runtime.supervisor --frontend-port 8080 -- tritonserver --model-repository=/models --http-port=8000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loraship_contract import API_KEY_ENV, API_KEY_HEADER

from .processes import cmdline, exit_text, http_ok, processes, remove_shm, stop_process_group

STUB = "triton_python_backend_stub"
#: Seconds the container's tritonserver may take to become ready: a cold replica reads the model from Azure
#: Files (locally, `loraship serve` waits READY_TIMEOUT_S of triton_repo/server.py).
CONTAINER_READY_TIMEOUT_S = 900.0
SHM_PREFIX_OPTION = "--backend-config=python,shm-region-prefix-name="
#: The frontend, run as a module of this package: ``loraship.triton_repo.runtime.openai_frontend`` here,
#: ``loraship_runtime.openai_frontend`` in the container.
FRONTEND_MODULE = f"{__package__}.openai_frontend"


class SupervisorError(Exception):
    """Supervision ended: its message is one line."""


class GaveUp(SupervisorError):
    """tritonserver needed more restarts than allowed within the window."""


class FrontendExited(SupervisorError):
    """A frontend process exited; ``child`` is the object whose ``process`` ended."""

    def __init__(self, message: str, child: Any) -> None:
        super().__init__(message)
        self.child = child


# -- the python stubs, from /proc ------------------------------------------------------------------

@dataclass(frozen=True)
class Stub:
    """A python-backend stub: ``triton_python_backend_stub <repo>/<model>/<version>/model.py ... <instance> DEFAULT``."""

    pid: int
    model: str
    version: str
    instance: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.version, self.instance


def stubs_of(pid: int) -> dict[tuple[str, str, str], set[int]]:
    """The live (not zombie) python stubs of the tritonserver ``pid``: (model, version, instance) -> pids.

    A stub named after its model, not an instance (``<model>_<group>_<n>``), is the short-lived one that
    the python backend starts for the model itself while a version loads (seen in poll mode); it exits when
    the load is done and serves nothing, so it is not watched."""
    found: dict[tuple[str, str, str], set[int]] = {}
    for proc in processes():
        if proc.ppid != pid or proc.state == "Z":
            continue
        stub = parse_stub(proc.pid, cmdline(proc.pid))
        if stub is not None and stub.instance != stub.model:
            found.setdefault(stub.key, set()).add(stub.pid)
    return found


def parse_stub(pid: int, argv: Sequence[str]) -> Stub | None:
    """The stub a command line runs, or None for any other process."""
    if len(argv) < 4 or not argv[0].endswith(STUB):
        return None
    path = Path(argv[1])  # <repo>/<model>/<version>/model.py
    return Stub(pid, path.parent.parent.name, path.parent.name, argv[-2])


# -- Triton over HTTP ------------------------------------------------------------------------------

def _post(url: str, api_key: str | None, timeout: float) -> bytes:
    """POST ``{}`` to one of Triton's JSON APIs, with the key where there is one; the body (urllib's errors raise)."""
    headers = {"Content-Type": "application/json", **({API_KEY_HEADER: api_key} if api_key else {})}
    with urllib.request.urlopen(urllib.request.Request(url, data=b"{}", headers=headers), timeout=timeout) as resp:
        return resp.read()


def repository_index(http_url: str, api_key: str | None = None, timeout: float = 5.0) -> dict[tuple[str, str], str] | None:
    """Triton's repository index, (model, version) -> state (READY, UNAVAILABLE, UNLOADING, ...); None if it does not answer."""
    try:
        entries = json.loads(_post(f"{http_url}/v2/repository/index", api_key, timeout))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return {(e["name"], str(e.get("version", ""))): e.get("state", "") for e in entries if isinstance(e, dict) and "name" in e}


def load_model(http_url: str, model: str, api_key: str | None = None, timeout: float = 900.0) -> None:
    """Triton's model-control load (``POST /v2/repository/models/<model>/load``), which returns once it is
    loaded; raises SupervisorError with Triton's error."""
    try:
        _post(f"{http_url}/v2/repository/models/{model}/load", api_key, timeout)
    except urllib.error.HTTPError as exc:
        raise SupervisorError(f"{model} did not load again: {exc.read().decode(errors='replace')[:300]}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SupervisorError(f"{model} did not load again: {exc}") from None


# -- supervision -----------------------------------------------------------------------------------

class Triton(Protocol):
    """What the supervisor needs of a tritonserver: ``loraship.triton_repo.server.TritonServer`` or :class:`Command`."""

    process: subprocess.Popen | None
    http_url: str
    api_key: str | None

    def start(self) -> Any: ...  # start, wait until ready; raise if it cannot be

    def stop(self, timeout: float = ...) -> Any: ...  # SIGTERM, SIGKILL its group after timeout; remove its shm


class Child(Protocol):
    process: subprocess.Popen | None


def to_stderr(line: str) -> None:
    """Say one line on stderr, at once."""
    print(line, file=sys.stderr, flush=True)


class Supervisor:
    """Watch ``triton`` (and ``frontends``) and restart Triton when it or one of its python stubs dies.

    >>> Supervisor(triton, [frontend], say=print).run()  # until Ctrl-C, GaveUp or FrontendExited
    """

    def __init__(self, triton: Triton, frontends: Sequence[Child] = (), say: Callable[[str], None] = to_stderr,
                 max_restarts: int = 5, window_s: float = 600.0, grace_s: float = 0.0, poll_s: float = 0.5,
                 hang_s: float = 30.0, probe_s: float = 5.0, max_backoff_s: float = 30.0) -> None:
        self.triton = triton
        self.frontends = list(frontends)
        self.say = say
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.hang_s = hang_s
        self.probe_s = probe_s
        self.max_backoff_s = max_backoff_s
        self.restarts: list[tuple[float, str, float]] = []  # (when, why, seconds until serving again)
        self._failures: list[float] = []  # when each fault was seen (restarts needed), within the window
        self._stubs: dict[tuple[str, str, str], set[int]] = {}
        self._live_at = self._probed_at = time.monotonic()

    def run(self) -> None:
        """Supervise until interrupted (KeyboardInterrupt) or an error ends it; Triton must be running."""
        self.watch()
        while True:
            self.check_frontends()
            reason = self.fault()
            if reason is not None:
                self.recover(reason)
            time.sleep(self.poll_s)

    def watch(self) -> None:
        """Take the running server's stubs as the ones to watch, and note a READY python model version that
        has none (its stub died between Triton's readiness and this first look): :meth:`fault` reports it."""
        self._stubs = stubs_of(self.triton.process.pid)
        self._live_at = self._probed_at = time.monotonic()
        for model, version in self.stubless_versions():  # watched as a stub already gone: fault() reports it
            self._stubs[(model, version, "")] = set()

    def stubless_versions(self) -> list[tuple[str, str]]:
        """The READY (model, version)s of the repository whose ``model.py`` runs in no live stub."""
        repo = getattr(self.triton, "repo", None) or _option(getattr(self.triton, "args", ()), "model-repository")
        index = repository_index(self.triton.http_url, self.triton.api_key) if repo else None
        watched = {(model, version) for model, version, _ in self._stubs}
        return [(model, version) for (model, version), state in sorted((index or {}).items())
                if state == "READY" and (model, version) not in watched and (Path(repo) / model / version / "model.py").is_file()]

    def check_frontends(self) -> None:
        for child in self.frontends:
            proc = child.process
            if proc is None:
                raise FrontendExited("the OpenAI frontend is not running", child)
            if (code := proc.poll()) is not None:
                raise FrontendExited(f"the OpenAI frontend {exit_text(code)} while Triton kept running", child)

    def fault(self) -> str | None:
        """Why Triton must be restarted now, or None while it serves."""
        proc = self.triton.process
        code = proc.poll()
        if code is not None:
            return f"tritonserver {exit_text(code)}"
        now = stubs_of(proc.pid)
        gone = {key: pids for key, pids in self._stubs.items() if key not in now}
        if gone:
            index = repository_index(self.triton.http_url, self.triton.api_key)
            if index is None:  # no answer now: look again at the next poll (a hang is caught below)
                now.update(gone)
            else:
                for model, version, instance in gone:
                    if index.get((model, version)) == "READY":
                        return f"{model}'s python stub {instance} died" if instance else f"{model}'s python stub died"
        self._stubs = now
        clock = time.monotonic()
        if clock - self._probed_at >= self.probe_s:
            self._probed_at = clock
            if http_ok(f"{self.triton.http_url}/v2/health/live", timeout=min(2.0, self.probe_s)):
                self._live_at = time.monotonic()
            elif clock - self._live_at >= self.hang_s:
                return f"tritonserver did not answer /v2/health/live for {clock - self._live_at:.0f} s"
        return None

    def recover(self, reason: str) -> float:
        """Restart Triton (with backoff) until it serves again; the seconds that took. Raises GaveUp."""
        start = time.monotonic()
        models = sorted({model for model, _, _ in self._stubs})  # what served before: explicit mode loads them again
        cause = reason
        while True:
            clock = time.monotonic()
            self._failures = [t for t in self._failures if clock - t < self.window_s] + [clock]
            if len(self._failures) > self.max_restarts:
                self.triton.stop(self.grace_s)
                raise GaveUp(f"gave up: {reason}, and tritonserver needed more than {self.max_restarts} restart(s) "
                             f"within {self.window_s:.0f} s")
            self.triton.stop(self.grace_s)  # every in-flight stream ends now, with an error
            time.sleep(min(self.max_backoff_s, 2.0 ** (len(self._failures) - 2)) if len(self._failures) > 1 else 0)
            try:
                self.triton.start()
                self.load_again(models)
            except FrontendExited:
                raise
            except Exception as exc:  # a start that fails is one more failure, retried after a longer wait
                reason = f"{cause}, then tritonserver failed to restart: {str(exc).splitlines()[0]}"
                continue
            break
        took = time.monotonic() - start
        self.watch()
        self.restarts.append((start, reason, took))
        self.say(f"recovered: {reason}; tritonserver restarted, serving again after {took:.1f} s")
        return took

    def load_again(self, models: Sequence[str]) -> None:
        """Load each of ``models`` that the restarted server has no READY version of (in explicit model-control
        mode it starts with none; in the other modes they are all READY already)."""
        index = repository_index(self.triton.http_url, self.triton.api_key)
        if index is None:
            raise SupervisorError("tritonserver did not answer its repository index after the restart")
        ready = {model for (model, _), state in index.items() if state == "READY"}
        for model in models:
            if model not in ready:
                load_model(self.triton.http_url, model, self.triton.api_key)


# -- the container's processes ---------------------------------------------------------------------

class Command:
    """A child process run from a command line, in its own process group; with ``ready_url``, ``start``
    waits until that URL answers 200 (Triton's readiness). ``shm_prefix``: its /dev/shm regions."""

    def __init__(self, args: Sequence[str], ready_url: str | None = None, http_url: str = "", api_key: str | None = None,
                 shm_prefix: str | None = None, ready_timeout: float = CONTAINER_READY_TIMEOUT_S, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.ready_url = ready_url
        self.http_url = http_url
        self.api_key = api_key
        self.shm_prefix = shm_prefix
        self.ready_timeout = ready_timeout
        self.env = env
        self.while_waiting: Callable[[], None] | None = None
        self.process: subprocess.Popen | None = None

    def start(self) -> "Command":
        """Start it (and wait until ``ready_url`` answers 200, calling ``while_waiting`` meanwhile)."""
        self.process = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        if self.ready_url is None:
            return self
        deadline = time.monotonic() + self.ready_timeout
        while not http_ok(self.ready_url):
            if self.while_waiting is not None:
                self.while_waiting()
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise SupervisorError(f"{Path(self.args[0]).name} {exit_text(code)} during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise SupervisorError(f"{Path(self.args[0]).name} was not ready after {self.ready_timeout:.0f} s")
            time.sleep(0.2)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, timeout)
        return remove_shm(self.shm_prefix) if self.shm_prefix else 0


def frontend_command(host: str, port: int, triton_url: str, repository: str | None = None) -> list[str]:
    """The OpenAI frontend's command line: this Python running :data:`FRONTEND_MODULE` (the key travels in
    ``LORASHIP_API_KEY``, never on the command line); ``repository``: where it installs hot-loaded adapters."""
    command = [sys.executable, "-m", FRONTEND_MODULE, "--host", host, "--port", str(port), "--triton", triton_url]
    return command + ["--model-repository", str(repository)] if repository else command


def _option(args: Sequence[str], name: str) -> str | None:
    """The last ``--name=value`` in ``args``."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def interrupt(signum: int, frame: object) -> None:
    """A signal handler: SIGTERM (and SIGINT, also where it was ignored, e.g. under `&`) stops like Ctrl-C."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run tritonserver (and the frontend of this package) under supervision until SIGTERM; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- tritonserver ARGS...")
    parser.add_argument("--frontend-port", type=int, help="run the OpenAI frontend on this port; Triton's HTTP then binds 127.0.0.1")
    parser.add_argument("--frontend-host", default="0.0.0.0", help="the frontend's address (default 0.0.0.0)")
    parser.add_argument("--max-restarts", type=int, default=5, help="give up after more restarts than this within --window")
    parser.add_argument("--window", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--ready-timeout", type=float, default=CONTAINER_READY_TIMEOUT_S,
                        help=f"seconds Triton may take to load (default {CONTAINER_READY_TIMEOUT_S:.0f})")
    parser.add_argument("triton", nargs=argparse.REMAINDER, help="the tritonserver command line, after --")
    args = parser.parse_args(argv)
    command = args.triton[1:] if args.triton[:1] == ["--"] else args.triton
    if not command:
        parser.error("give the tritonserver command after --")
    prefix = (_option(command, "backend-config=python,shm-region-prefix-name") or "")
    if not prefix:
        prefix = f"loraship_{uuid.uuid4().hex[:12]}_"
        command.append(SHM_PREFIX_OPTION + prefix)
    if args.frontend_port:
        command.append("--http-address=127.0.0.1")
    http_url = f"http://127.0.0.1:{_option(command, 'http-port') or 8000}"
    api_key = os.environ.get(API_KEY_ENV) or None
    triton = Command(command, ready_url=f"{http_url}/v2/health/ready", http_url=http_url, api_key=api_key,
                     shm_prefix=prefix, ready_timeout=args.ready_timeout)
    frontends = []
    if args.frontend_port:
        repository = _option(command, "model-repository") or _option(command, "model-store")
        frontends.append(Command(frontend_command(args.frontend_host, args.frontend_port, http_url, repository)))
    supervisor = Supervisor(triton, frontends, max_restarts=args.max_restarts, window_s=args.window)
    triton.while_waiting = supervisor.check_frontends  # a frontend that dies while the models load ends it too
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt)
    try:
        for child in frontends:  # first, so liveness answers while the models load
            child.start()
        triton.start()
        supervisor.run()
    except KeyboardInterrupt:
        return 0
    except SupervisorError as exc:
        to_stderr(f"loraship supervisor: {exc}")
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal does not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        for child in frontends:
            child.stop(15.0)
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
