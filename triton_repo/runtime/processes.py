"""Processes and probes, stdlib only: /proc, process groups, the python stubs' /dev/shm regions, HTTP health.

One implementation for both sides: the supervisor (here, and in the container) and loraship's own
``TritonServer`` and ``OpenAIFrontend``, which start their children the same way (each leads its own
process group, so a stop reaches tritonserver's python stubs too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class Proc:
    pid: int
    state: str  # R, S, D, Z (zombie), ...
    ppid: int
    pgrp: int


def processes() -> Iterator[Proc]:
    """Every process this machine (or container) shows in /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        yield Proc(int(entry), fields[0].decode(), int(fields[1]), int(fields[2]))


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    return [p.pid for p in processes() if p.pgrp == pgid and p.state != "Z"]


def reap_orphans(pgid: int) -> None:
    """Reap zombies of group ``pgid`` that were handed to this process (it is PID 1 in a container)."""
    me = os.getpid()
    for proc in processes():
        if proc.state == "Z" and proc.ppid == me and proc.pgrp == pgid and proc.pid != pgid:
            try:
                os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def stop_process_group(proc: subprocess.Popen, timeout: float, reap_timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` (a process-group leader), SIGKILL its group after ``timeout`` s (at once with 0);
    then wait for the rest of its group (tritonserver's python stubs) to go, killing them after
    ``reap_timeout`` s, or at once when ``proc`` had already exited (a crashed server's stubs serve nobody)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.wait()
    else:
        _killpg(proc.pid)
    deadline = time.monotonic() + reap_timeout
    while True:
        reap_orphans(proc.pid)
        if not group_members(proc.pid):
            return
        if time.monotonic() > deadline:
            _killpg(proc.pid)
            deadline = float("inf")
        time.sleep(0.05)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def exit_text(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def shm_regions(prefix: str) -> list[Path]:
    """The /dev/shm regions named ``prefix*`` (the python stubs')."""
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


def remove_shm(prefix: str) -> int:
    """Remove the /dev/shm regions named ``prefix*``; how many there were."""
    regions = shm_regions(prefix)
    for region in regions:
        region.unlink(missing_ok=True)
    return len(regions)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_ready(base_url: str, timeout: float = 2.0) -> bool:
    """Whether Triton's readiness (``/v2/health/ready``, directly or through the frontend) answers 200."""
    return http_ok(f"{base_url}/v2/health/ready", timeout)
