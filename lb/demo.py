"""`python -m lb --demo`: a stand-in fleet for a first run without GPU servers.

Starts one simulated backend per configured backend URL on 127.0.0.1 (the
defaults: 6093 and 6094) as child processes, then the balancer runs as usual.
The stand-ins are separate programs (`python -m backends.echo`); the balancer
does not import them.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .config import Config

log = logging.getLogger("lb")

START_TIMEOUT = 10.0


@contextmanager
def demo_fleet(config: Config) -> Iterator[None]:
    children: list[subprocess.Popen] = []
    try:
        for backend in config.backends:
            if backend.host not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit(f"lb: --demo runs backends on this machine only; "
                                 f"{backend.name} is at {backend.url}")
            child = subprocess.Popen(
                [sys.executable, "-m", "backends.echo", "--host", backend.host,
                 "--port", str(backend.port)],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            children.append(child)
            line = _first_line(child)
            if not line.startswith("listening on"):
                raise SystemExit(f"lb: demo backend for {backend.name} did not start "
                                 f"(is port {backend.port} in use?)")
            log.info("demo backend %s started: %s (pid %d)", backend.name, backend.url, child.pid)
        yield
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()


def _first_line(child: subprocess.Popen) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if line or child.poll() is not None:
            return line.strip()
    return ""
