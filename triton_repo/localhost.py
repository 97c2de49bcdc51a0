"""This machine's ports and log files, for the servers loraship starts (tritonserver, the frontend)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path


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
